"""Non-finite loss or gradients: detected inside the compiled step, the step left undone.

    after (every graph):
        flags = lordo.finite_flags([loss, grad_W0, grad_W1, ...])     # one bool per tensor
        ok = flags.all()
        every writeback  x.copy_(new)  becomes  x.copy_(torch.where(ok, new, x))
        nonfinite_flags.copy_(flags); nonfinite_skipped.copy_(skipped + ~ok)

The gradients checked are those the updates read (after any all-reduce), so under data
parallelism every worker decides the same way. With local steps between syncs (sync, lordo)
a bad gradient is one worker's own, and its values must not reach the others:

    local step:  poison.copy_(torch.where(ok, poison, nan))            # remembered until the sync
    sync step:   every float payload p sent becomes p + poison         # NaN everywhere if any worker was bad
                 (a payload the runtime sends after the graph, Role.SENT, is written unguarded,
                 and what it brought, Role.RECEIVED, is checked where a later graph reads it)
                 flags = lordo.finite_flags([received..., loss, grads...])

so a worker with a bad local step does not apply it, warns, and trains on; at the next sync
every worker receives a non-finite payload, and every worker raises the same `NonFiniteError`
at the same step (the received payload is checked first), each with its state as before
that sync; restart them from the last checkpoint. "skip" is refused there: a worker that
skipped alone would fall out of step with the others.

The runtime reads the flags after each call (one small host read per step; on a GPU, with
"raise", when the next call starts, so that the host never waits for the device).
`on_nonfinite="raise"` raises `NonFiniteError` naming the step and the first bad tensor;
the state is as it was before the step. `"skip"` counts the step in `nonfinite.skipped`,
leaves the step counter (and so the schedule) where it was, warns once, and training goes on.
"""

from __future__ import annotations

import warnings

import networkx as nx
import torch
import torch.distributed as dist
import torch.fx as fx

from ..graph import PARAM, ROLE, Role, StateSpec, TrainGraph, events_name, tag
from ..ops.registry import define_aux_op
from ..runtime.executor import NonFiniteError
from .collectives import WAIT, spans_every_worker, world_size
from .manager import PassResult, PassRuntime, Program, RuntimeContext, Stage, register_pass

MODES = ("raise", "skip")
FLAGS = StateSpec(name="nonfinite.flags", shape=(1,), dtype=torch.bool, owner="on_nonfinite", init="ones",
                  holds="scratch")
SKIPPED = StateSpec(name="nonfinite.skipped", shape=(), dtype=torch.int64, owner="on_nonfinite")
# NaN from a worker's bad local step until the sync, where it is added to what the worker sends.
POISON = StateSpec(name="nonfinite.poison", shape=(), dtype=torch.float32, owner="on_nonfinite")
RECEIVED = "payload received at the sync"
# On the finite_flags node of a graph whose step is local to each worker (no collective before
# the checked gradients) in a run of several workers.
LOCAL = "lordo_nonfinite_local"
# The finite_flags node carries what each of its flags checks, for the runtime's message.
LABELS = "lordo_nonfinite_labels"


def finite_flags_math(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Whether each tensor's 2-norm is finite: NaN and inf carry through it exactly, and a
    finite tensor fails only where its norm overflows float32 (above about 1.8e19), as
    `clip_grad_norm_(error_if_nonfinite=True)` fails it. One ATen foreach call per width,
    which Inductor leaves to ATen: a reduction per tensor fused into the backward's kernels
    lengthens the first call's code generation, and of the foreach reductions the norm is the
    cheapest on CPU (the largest magnitude, exact as well, is several times slower there)."""
    norms: list[torch.Tensor | None] = [None] * len(tensors)
    # Half-width norms are taken in float32: in their own type they would overflow at 65504.
    for narrow, dtype in ((True, torch.float32), (False, None)):
        indices = [i for i, t in enumerate(tensors) if (t.dtype.itemsize < 4) == narrow]
        if indices:
            for i, norm in zip(indices, torch._foreach_norm([tensors[i] for i in indices], 2, dtype=dtype)):
                norms[i] = norm
    return torch.stack([norm.float() for norm in norms]).isfinite()


finite_flags = define_aux_op(
    "finite_flags", "(Tensor[] tensors) -> Tensor", finite_flags_math,
    lambda tensors: torch.empty(len(tensors), dtype=torch.bool, device=tensors[0].device),
)


def _over_every_worker(node: fx.Node) -> bool:
    """A collective node that combines every worker (not one level of two); one whose group
    is not an argument (a pass's own exchange) counts as combining every worker."""
    collective = node.args[0] if node.target is WAIT else node
    names = [a for a in collective.args if isinstance(a, str)] if isinstance(collective, fx.Node) else []
    return not names or not dist.is_initialized() or spans_every_worker(names[-1])


def _after_a_collective(node: fx.Node) -> bool:
    """Whether `node` comes out of a collective over every worker, so that every worker sees
    the same value (over the inner level of two, only that level's workers do)."""
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current.meta.get(ROLE) == Role.COLLECTIVE and _over_every_worker(current):
            return True
        for source in current.all_input_nodes:
            if source not in seen:
                seen.add(source)
                stack.append(source)
    return False


def _poison_payloads(graph: TrainGraph, poison: fx.Node) -> list[fx.Node]:
    """Add `poison` to every float tensor a collective sends; return the float tensors received."""
    g = graph.graph
    collectives = [n for n in g.nodes if n.meta.get(ROLE) == Role.COLLECTIVE]
    for node in collectives:
        sent = node.args[0] if node.args else None
        if not isinstance(sent, fx.Node) or sent.meta.get(ROLE) == Role.COLLECTIVE:
            continue
        value = sent.meta.get("val")
        if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
            continue
        with g.inserting_before(node):
            poisoned = tag(g.call_function(torch.ops.aten.add.Tensor, (sent, poison)), sent.meta.get(ROLE, Role.OTHER),
                           name=f"poisoned_{sent.name}")
        node.args = (poisoned, *node.args[1:])
    # What the runtime sends after the graph: poisoned where it is written.
    for sent in [n for n in g.nodes if n.meta.get(ROLE) == Role.SENT and graph.value(n).dtype.is_floating_point]:
        with g.inserting_after(sent):
            poisoned = tag(g.call_function(torch.ops.aten.add.Tensor, (sent, poison)), Role.SENT,
                           name=f"poisoned_{sent.name}")
        sent.replace_all_uses_with(poisoned, delete_user_cb=lambda user: user is not poisoned)
    received = []
    for node in collectives:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.dtype.is_floating_point and \
                not any(user.meta.get(ROLE) == Role.COLLECTIVE for user in node.users):
            received.append(node)
    return received + [n for n in g.nodes
                       if n.meta.get(ROLE) == Role.RECEIVED and graph.value(n).dtype.is_floating_point]


def _largest_received(graph: TrainGraph, received: list[fx.Node], poison: fx.Node) -> fx.Node:
    """One scalar, NaN or inf where any received value is: every graph of a run with local steps
    checks one (zero in a graph that receives nothing), so the flags have one length."""
    g = graph.graph
    if not received:
        with g.inserting_after(poison):
            return tag(g.call_function(torch.zeros_like, (poison,)), Role.OPTIMIZER_UPDATE, name="nothing_received")
    with g.inserting_before(max(received, key=list(g.nodes).index).next):
        largest = [g.call_function(torch.ops.aten.amax.default, (g.call_function(torch.ops.aten.abs.default, (r,)),))
                   for r in received]
        return tag(g.call_function(torch.ops.aten.amax.default, (g.call_function(torch.stack, (largest,)),)),
                   Role.OPTIMIZER_UPDATE, name="largest_received")


def _select(g: fx.Graph, ok: fx.Node, new: fx.Node, target: fx.Node, dtype: torch.dtype) -> fx.Node:
    """torch.where(ok, new, target); fp8 codes are selected as their bytes, since Inductor's C++
    code generation cannot promote a bool with an fp8 type in a fused loop (ECO fp8, batch 1)."""
    if dtype.is_floating_point and dtype.itemsize == 1:
        as_bytes = [g.call_method("view", (n, torch.uint8)) for n in (new, target)]
        return g.call_method("view", (g.call_function(torch.where, (ok, *as_bytes)), dtype))
    return g.call_function(torch.where, (ok, new, target))


def _guard(graph: TrainGraph) -> None:
    g = graph.graph
    output = next(n for n in reversed(g.nodes) if n.op == "output")
    losses = [n for n in g.nodes if n.meta.get(ROLE) == Role.LOSS]
    loss = losses[-1] if losses else output.args[0][0]
    sites = [s for s in graph.updates() if "lr" in s.op.hyperparameters]
    local = world_size(None) > 1 and not any(_after_a_collective(s.input("grad")) for s in sites)
    received, poison, receives = [], None, False
    if local:
        poison = graph.add_state(POISON)
        payloads = _poison_payloads(graph, poison)
        # A graph that sends and receives in itself: a bad step of one worker spoils what every
        # worker receives here, so all raise at once. Where the payload arrived from an earlier
        # step (RECEIVED), a bad step here is this worker's alone, found at its next sync.
        receives = any(n.meta.get(ROLE) == Role.COLLECTIVE for n in payloads)
        received = [_largest_received(graph, payloads, poison)]
    labels = (RECEIVED,) * len(received) + ("loss",) + tuple(
        f"{'projected ' if s.op.projected_gradient else ''}gradient of {s.param}" for s in sites)
    flags_state = graph.add_state(StateSpec(name=FLAGS.name, shape=(len(labels),), dtype=torch.bool,
                                            owner=FLAGS.owner, init="ones", holds="scratch"))
    skipped = graph.add_state(SKIPPED)
    writebacks = [n for n in g.nodes if n.meta.get(ROLE) == Role.WRITEBACK and n.target == "copy_"]
    order = {n: i for i, n in enumerate(g.nodes)}
    checked = received + [loss] + [s.input("grad") for s in sites]
    anchor = max(checked, key=order.__getitem__)
    with g.inserting_after(anchor):
        flags = tag(g.call_function(finite_flags, (checked,)), Role.OPTIMIZER_UPDATE, name="finite_flags")
    flags.meta[LABELS] = labels
    flags.meta[LOCAL] = local and not receives
    with g.inserting_after(flags):
        ok = tag(g.call_method("all", (flags,)), Role.OPTIMIZER_UPDATE, name="step_is_finite")
    order = {n: i for i, n in enumerate(g.nodes)}
    for write in writebacks:
        target, new = write.args
        if poison is not None and new.meta.get(ROLE) == Role.SENT:
            # Every worker sends after every graph that writes a payload, a bad step's too: its
            # NaN is what stops the others at the merge.
            continue
        if order[write] < order[ok]:
            # A write before the check (a projection refreshed before the gradient is
            # reduced) moves after it, unless something in between reads what it wrote.
            readers = [u for u in target.users if order[write] < order[u] < order[ok]]
            if readers:
                raise NotImplementedError(
                    f"on_nonfinite cannot guard {target.name}: {readers[0].name} reads it between its write and "
                    f"the last gradient. Use on_nonfinite=None with this policy."
                )
            ok.append(write)
        with g.inserting_before(write):
            kept = _select(g, ok, new, target, graph.value(target).dtype)
        kept.meta[ROLE] = Role.OPTIMIZER_UPDATE
        if PARAM in write.meta:
            kept.meta[PARAM] = write.meta[PARAM]
        write.args = (target, kept)
    with g.inserting_before(output):
        tag(g.call_method("copy_", (flags_state, flags)), Role.WRITEBACK, state=FLAGS.name, name="write_finite_flags")
        bad = g.call_function(torch.ops.aten.logical_not.default, (ok,))
        count = g.call_function(torch.ops.aten.add.Tensor, (skipped, bad))
        tag(g.call_method("copy_", (skipped, count)), Role.WRITEBACK, state=SKIPPED.name, name="count_skipped")
        if poison is not None:
            nan = tag(g.call_function(torch.full_like, (poison, float("nan"))), Role.OPTIMIZER_UPDATE)
            kept = tag(g.call_function(torch.where, (ok, poison, nan)), Role.OPTIMIZER_UPDATE)
            tag(g.call_method("copy_", (poison, kept)), Role.WRITEBACK, state=POISON.name, name="remember_poison")


def _communicates(graph: TrainGraph) -> bool:
    return any(n.meta.get(ROLE) in (Role.COLLECTIVE, Role.SENT, Role.RECEIVED) for n in graph.graph.nodes)


def _check_every_worker_decides_alike(graphs: dict[str, TrainGraph]) -> None:
    """With "skip" every worker must skip the same steps: where the step communicates, every
    gradient the guard checks must come out of a collective (as DDP's averaged gradients do)."""
    if not any(_communicates(graph) for graph in graphs.values()):
        return
    local = []
    for name, graph in graphs.items():
        flags = next(n for n in graph.graph.nodes if LABELS in n.meta)
        dag = graph.to_networkx()
        collectives = {n.name for n in graph.graph.nodes
                       if n.meta.get(ROLE) == Role.COLLECTIVE and _over_every_worker(n)}
        for checked in flags.args[0][1:]:
            if not nx.ancestors(dag, checked.name) & collectives:
                local.append(name)
                break
    if local:
        # A bad gradient seen by one worker alone: skipping it there alone would shift that
        # worker's schedule, and its next exchange would meet another step's.
        raise ValueError(
            f"on_nonfinite='skip' cannot be used with local steps between syncs (or gossip): in graphs "
            f"{sorted(local)} the gradients checked are each worker's own, so a worker that skipped a step "
            "alone would fall out of step with the others. Use on_nonfinite='raise' and restart every worker "
            "from the last checkpoint."
        )


def reads_later(flags: torch.Tensor) -> bool:
    """Whether the flags are read one call late: on a GPU a read right after the call would
    wait for the device to finish the step, every step, and leave it idle while the host
    queues the next one."""
    return flags.is_cuda


class NonFiniteGuard(PassRuntime):
    """Reads the flags after every call (one small host read): raises `NonFiniteError` naming
    the first bad tensor, or, with "skip", says the step was not applied and warns once.

    Where `reads_later` (a GPU), "raise" copies the flags to the host without waiting and
    reads them when the next call starts (or at a checkpoint, `settle`): a bad step is still
    not applied (its writes are guarded in the graph), its counter is taken back, and the
    next call raises before it runs. "skip" must know at once whether the step counts, so
    it reads at once everywhere."""

    def __init__(self, mode: str, context: RuntimeContext) -> None:
        super().__init__(mode, context)
        if mode == "skip":
            _check_every_worker_decides_alike(context.graphs)
        self.labels = {name: next(n.meta[LABELS] for n in graph.graph.nodes if LABELS in n.meta)
                       for name, graph in context.graphs.items()}
        communicates = any(_communicates(graph) for graph in context.graphs.values())
        self.local = {name: communicates and next(n.meta[LOCAL] for n in graph.graph.nodes if LABELS in n.meta)
                      for name, graph in context.graphs.items()}
        self.warned = False
        self.flags: torch.Tensor | None = None
        self.late = False
        self.host: torch.Tensor | None = None
        self.copied = None
        self.pending: tuple[frozenset[str], int] | None = None
        self.failed: NonFiniteError | None = None

    def setup(self, fresh: set[str]) -> None:
        # This capture's own flags: a capture over other parameters (a layer frozen since)
        # allocates a vector of another length, and this capture's graphs keep writing this one.
        self.flags = self.context.runtime.tensors[FLAGS.name]
        self.late = self.option == "raise" and reads_later(self.flags)
        if self.late:
            self.host = torch.empty(self.flags.shape, dtype=self.flags.dtype, pin_memory=self.flags.is_cuda)
            self.copied = torch.cuda.Event() if self.flags.is_cuda else None

    def around_call(self, events: frozenset[str]):
        self.settle()
        if self.failed is not None:
            error, self.failed = self.failed, None
            raise error
        return None

    def after_call(self, events: frozenset[str]) -> bool:
        if not self.late:
            return self._judge(self.flags, events, self.context.runtime.step)
        self.host.copy_(self.flags, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        self.pending = (events, self.context.runtime.step)
        return True

    def settle(self) -> None:
        if self.pending is None:
            return
        (events, step), self.pending = self.pending, None
        if self.copied is not None:
            self.copied.synchronize()
        try:
            self._judge(self.host, events, step)
        except NonFiniteError as error:
            self.context.runtime.step = step
            self.failed = error

    def load_state_dict(self, state) -> None:
        # A checkpoint loaded over a bad step that was read late replaces what it spoilt.
        self.pending = self.failed = None

    def _judge(self, flags: torch.Tensor, events: frozenset[str], step: int) -> bool:
        if bool(flags.all()):
            return True
        name = events_name(events)
        first = self.labels[name][int((~flags).nonzero()[0])]
        late = (" (read when the next call started: on a GPU the check is read one call late, so that the host "
                "does not wait for the device every step; that call did not run)" if self.late else "")
        if self.local[name] and first != RECEIVED:
            warnings.warn(f"step {step}: the {first} is not finite on this worker; the step was not "
                          "applied here, and every worker will raise at the next sync, whose values this worker "
                          "spoils on purpose so that none of its own reach the others. Restart every worker from "
                          "the last checkpoint then.", RuntimeWarning, stacklevel=4)
            return True
        if self.option == "skip":
            if not self.warned:
                self.warned = True
                warnings.warn(f"step {step}: the {first} is not finite; the step was skipped "
                              "(counted in nonfinite.skipped; warned once)", RuntimeWarning, stacklevel=4)
            return False
        if first == RECEIVED:
            raise NonFiniteError(
                f"step {step} (graph {name!r}): the {first} is not finite: a worker's own values were "
                "not, at this step or at a local step since the last sync (that worker warned then). Every "
                "worker raises here; none applied this step, so each one's parameters and optimizer state are "
                f"as before it. Restart every worker from the last checkpoint.{late}"
            )
        raise NonFiniteError(
            f"step {step} (graph {name!r}): the {first} is not finite (NaN or inf); the step "
            "was not applied, so parameters and optimizer state are as before it. Lower the learning rate, "
            f"check the batch, or use Policy(on_nonfinite='skip') to skip such steps and count them.{late}"
        )


@register_pass("on_nonfinite", stage=Stage.GUARD, option="on_nonfinite", runtime=NonFiniteGuard)
def on_nonfinite(program: Program, mode: str) -> PassResult:
    _guard(program.graph)
    return PassResult(program, (f"non-finite loss or gradients: {mode} (state left as before the step)",))
