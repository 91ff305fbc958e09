"""Compressed gossip on a ring instead of an all-reduce: DoCoM-SGT (docs/passes/gossip.md).

Each worker keeps its own parameters theta, a gradient tracker g, a momentum v, and for
both theta and g a public copy (x_hat, what its neighbours know of x) and the weighted
sum of its neighbourhood's copies (x_mix = sum_j W_ij x_hat_j). All are flat vectors over
the parameters, in update order. Per step, with the batch xi:

    event "init" (step 0):
        theta_hat = theta_mix = theta;  v' = grad f(theta; xi);  g' = v'
        theta' = opt(theta, g') + gamma (theta_mix - theta_hat)
        q_theta = Q(theta' - theta_hat)                      exchanged with the two neighbours
    every later step:
        v' = grad f(theta; xi) + (1 - beta) (v - grad f(theta_prev; xi))    momentum (STORM)
        g' = g + gamma (g_mix - g_hat) + v' - v                             gradient tracking
        theta' = opt(theta, g') + gamma (theta_mix - theta_hat)             consensus step
        q_g = Q(g' - g_hat); q_theta = Q(theta' - theta_hat)                compressed messages
        received = lordo.neighbour_exchange(pack(q_g, q_theta), group, neighbours, neighbours)
        x_hat += q_x;  x_mix += W_ii q_x + sum_j W_ij q_x,j                 for x in (g, theta)

`opt` is the step's own optimizer node (lordo.adamw, lordo.sgd, ...) with g' as its
gradient; with plain SGD it is the paper's theta - eta g'. The pass rewrites at two stages:
COMBINE (the tracked gradient into the update, the consensus step after it) and SYNC (the
messages, built from what the step finally stores in theta): so every optimizer-side
rewrite between them (GaLore, CAGE, a lookahead, ECO's requantization) acts on each
worker's update as in one process, and the copies track the stored parameters. grad f(theta_prev; xi) is a
second forward and backward of the captured step, at the previous parameters, on the same
batch (beta = 1 needs none). Q is top-k of |x| over the flat vector; a message is k int32
indices and k values, packed into one int32 buffer sent point to point to each neighbour.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx

from ..graph import DECISION, ROLE, STATE, Role, StateSpec, TrainGraph, tag
from ..ops.gossip import NEIGHBOUR_EXCHANGE, exchange_bytes, message_sum, top_k_message
from ..runtime.comm import Collective
from .collectives import WORKERS_COMBINE, group_name, rank, remove_gradient_all_reduces, world_size
from .manager import INIT, PassResult, PassRuntime, Program, Stage, register_pass
from .outer import end_of_updates

TOPOLOGIES = ("ring",)
COMPRESSORS = ("top_k", "identity")
# The flat parameters at the step's start (init graph), marked for the exchange at stage SYNC.
_START = "lordo_gossip_start"


@dataclass(frozen=True, kw_only=True)
class Gossip:
    """DoCoM-SGT: compressed gossip with gradient tracking and momentum (docs/passes/gossip.md).

    Args:
      topology: "ring": worker i talks to i - 1 and i + 1 (mod n), mixing weights 1/3 each
        (1/2 with two workers).
      compressor: "top_k" (the `ratio` largest entries by magnitude, as int32 index and
        value) or "identity" (the whole vector: exact gossip, for comparison).
      ratio: the fraction of entries top-k sends, in (0, 1].
      gamma: the consensus step size, in (0, 1].
      beta: the momentum's weight on the fresh gradient, in (0, 1]; 1 is plain gradient
        tracking, without the second forward and backward per step.
      group: the process group (None: the default group).

    Raises:
      ValueError: for a value out of range or an unknown choice, naming the field.
    """

    topology: str = "ring"
    compressor: str = "top_k"
    ratio: float = 0.01
    gamma: float = 0.1
    beta: float = 0.1
    group: object = None

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"Gossip.topology must be one of {TOPOLOGIES}, got {self.topology!r}")
        if self.compressor not in COMPRESSORS:
            raise ValueError(f"Gossip.compressor must be one of {COMPRESSORS}, got {self.compressor!r}")
        for name in ("ratio", "gamma", "beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
                raise ValueError(f"Gossip.{name} must be a number in (0, 1], got {value!r}")


def ring(rank: int, world: int) -> tuple[list[int], list[float]]:
    """The ring neighbours of `rank` and the mixing weights (self first, then each neighbour)."""
    neighbours = sorted({(rank - 1) % world, (rank + 1) % world} - {rank})
    share = 1.0 / (len(neighbours) + 1)
    return neighbours, [share] * (len(neighbours) + 1)


@dataclass(frozen=True)
class _Layout:
    params: list[str]
    shapes: list[tuple[int, ...]]
    sizes: list[int]
    k: int

    @property
    def total(self) -> int:
        return sum(self.sizes)


def _layout(graph: TrainGraph, option: Gossip) -> _Layout:
    sites = graph.updates()
    other = [f"{s.param} ({graph.params[s.param].dtype})" for s in sites if graph.params[s.param].dtype != torch.float32]
    if other:
        raise NotImplementedError(f"Gossip packs messages as 32-bit words and needs float32 parameters; got "
                                  f"{', '.join(other)}. Keep the parameters in float32.")
    shapes = [tuple(graph.params[s.param].shape) for s in sites]
    sizes = [math.prod(shape) for shape in shapes]
    total = sum(sizes)
    k = total if option.compressor == "identity" else max(1, min(total, round(option.ratio * total)))
    return _Layout([s.param for s in sites], shapes, sizes, k)


def _state(graph: TrainGraph, option: Gossip, layout: _Layout) -> dict[str, fx.Node]:
    keys = ["param_hat", "param_mix", "tracker", "tracker_hat", "tracker_mix", "momentum"]
    if option.beta < 1:
        keys.append("previous_param")
    return {key: graph.add_state(StateSpec(name=f"gossip.{key}", shape=(layout.total,), dtype=torch.float32,
                                           owner="gossip")) for key in keys}


def _flat(g: fx.Graph, nodes: list[fx.Node], role: Role, name: str) -> fx.Node:
    return tag(g.call_function(torch.cat, ([g.call_method("reshape", (n, -1)) for n in nodes],)), role, name=name)


def _pieces(g: fx.Graph, flat: fx.Node, layout: _Layout, role: Role, name: str) -> list[fx.Node]:
    split = g.call_function(torch.split, (flat, layout.sizes))
    return [tag(g.call_method("view", (g.call_function(operator.getitem, (split, i)), shape)), role, param,
                name=f"{name}_{param}")
            for i, (param, shape) in enumerate(zip(layout.params, layout.shapes))]


def _gradients_at_previous(graph: TrainGraph, previous_flat: fx.Node, layout: _Layout) -> list[fx.Node]:
    """The step's forward and backward again, on the same batch, at the previous parameters.

    Each parameter W is read as previous_W + (W - W.detach()): the value of the previous
    parameters exactly, and the gradient with respect to W is the gradient there.
    """
    g = graph.graph
    grad_call = next(n for n in g.nodes if n.op == "call_function" and n.target is torch.autograd.grad)
    loss, inputs = grad_call.args[0], list(grad_call.args[1])
    names = {s.input("param"): s.param for s in graph.updates()}
    upstream = nx.ancestors(graph.to_networkx(), loss.name) | {loss.name}
    forward = [n for n in g.nodes if n.name in upstream and n.op in ("call_function", "call_method")]
    copied: dict[fx.Node, fx.Node] = {}
    # Inserting before a fixed node keeps creation order, so each node follows its inputs.
    with g.inserting_before(grad_call.next):
        previous = _pieces(g, previous_flat, layout, Role.OPTIMIZER_STATE, "previous_value")
        for param, prev in zip(names, previous):
            offset = g.call_function(torch.ops.aten.sub.Tensor, (param, g.call_method("detach", (param,))))
            copied[param] = tag(g.call_function(torch.ops.aten.add.Tensor, (prev, offset)), Role.FORWARD,
                                names[param], name=f"previous_{names[param]}")
        for node in forward:
            if node.meta.get(DECISION) or not any(a in copied for a in node.all_input_nodes):
                continue
            buffers = [a for a in node.all_input_nodes if a.meta.get(ROLE) == Role.BUFFER]
            if buffers:
                raise NotImplementedError(
                    f"Gossip(beta < 1) runs the forward twice per step, and {node.name} reads buffer "
                    f"{buffers[0].name}, which a second forward could update twice (BatchNorm statistics). "
                    "Use Gossip(beta=1), which needs one forward.")
            role = node.meta.get(ROLE, Role.FORWARD)
            # The step has one loss; this one only feeds the second backward.
            copied[node] = tag(g.node_copy(node, lambda a: copied.get(a, a)),
                               Role.FORWARD if role == Role.LOSS else role, name=f"previous_{node.name}")
        grads = tag(g.call_function(torch.autograd.grad, (copied[loss], inputs), dict(grad_call.kwargs)),
                    Role.BACKWARD, name="grad_at_previous")
        grads.meta.update({k: grad_call.meta[k] for k in ("val", "example_value") if k in grad_call.meta})
        return [tag(g.call_function(operator.getitem, (grads, inputs.index(p))), Role.GRADIENT, names[p],
                    name=f"grad_at_previous_{names[p]}") for p in names]


def _track(graph: TrainGraph, option: Gossip, layout: _Layout, first: bool) -> None:
    """The tracked gradient into each update, the consensus step added to what it writes."""
    g = graph.graph
    sites = graph.updates()
    state = _state(graph, option, layout)
    order = {n: i for i, n in enumerate(g.nodes)}
    first_update = min((s.node for s in sites), key=order.__getitem__)
    gamma, beta = float(option.gamma), float(option.beta)
    update = Role.OPTIMIZER_UPDATE

    def op(target, *args, name=None, role=update):
        return tag(g.call_function(target, args), role, name=name)

    previous_gradients = None
    if not first and beta < 1:
        previous_gradients = _gradients_at_previous(graph, state["previous_param"], layout)
    with g.inserting_before(first_update):
        params = [s.input("param") for s in sites]
        gradient = _flat(g, [s.input("grad") for s in sites], Role.GRADIENT, "flat_gradient")
        if first:
            theta = _flat(g, params, update, "flat_param")
            theta.meta[_START] = True
            momentum = tracker = gradient
            if beta < 1:
                tag(g.call_method("copy_", (state["previous_param"], theta)), Role.WRITEBACK,
                    state="gossip.previous_param", name="write_previous_param")
        else:
            momentum = gradient
            if previous_gradients is not None:
                previous = _flat(g, previous_gradients, Role.GRADIENT, "flat_gradient_at_previous")
                correction = op(torch.ops.aten.sub.Tensor, state["momentum"], previous, name="momentum_correction")
                momentum = op(torch.ops.aten.add.Tensor, gradient,
                              op(torch.ops.aten.mul.Tensor, correction, 1 - beta, name="scaled_correction"),
                              name="new_momentum")
                flat_params = _flat(g, params, update, "flat_param")
                tag(g.call_method("copy_", (state["previous_param"], flat_params)), Role.WRITEBACK,
                    state="gossip.previous_param", name="write_previous_param")
            disagreement = op(torch.ops.aten.sub.Tensor, state["tracker_mix"], state["tracker_hat"],
                              name="tracker_disagreement")
            tracked = op(torch.ops.aten.add.Tensor, state["tracker"],
                         op(torch.ops.aten.mul.Tensor, disagreement, gamma, name="tracker_consensus"))
            change = op(torch.ops.aten.sub.Tensor, momentum, state["momentum"], name="momentum_change")
            tracker = op(torch.ops.aten.add.Tensor, tracked, change, name="new_tracker")
            disagreement = op(torch.ops.aten.sub.Tensor, state["param_mix"], state["param_hat"],
                              name="param_disagreement")
            consensus = op(torch.ops.aten.mul.Tensor, disagreement, gamma, name="param_consensus")
            consensus_pieces = _pieces(g, consensus, layout, update, "consensus")
        tracker_pieces = _pieces(g, tracker, layout, Role.GRADIENT, "tracked_gradient")
    for i, site in enumerate(sites):
        site.node.replace_input_with(site.input("grad"), tracker_pieces[i])
        if not first:
            write = graph.final_write(site.param)
            with g.inserting_before(write):
                mixed = tag(g.call_function(torch.ops.aten.add.Tensor, (write.args[1], consensus_pieces[i])), update,
                            site.param, name=f"mixed_{site.param}")
            write.args = (write.args[0], mixed)
    with g.inserting_before(end_of_updates(graph)):
        for key, value in (("tracker", tracker), ("momentum", momentum)):
            tag(g.call_method("copy_", (state[key], value)), Role.WRITEBACK, state=f"gossip.{key}",
                name=f"write_{key}")


def _exchange_stored(graph: TrainGraph, option: Gossip, layout: _Layout, group: str | None, neighbours: list[int],
                     weights: list[float], first: bool) -> int:
    """Compress what changed of the stored parameters (and of the tracker), exchange it with
    the neighbours, update the copies; returns the bytes sent to each neighbour."""
    g = graph.graph
    state = {n.meta[STATE].removeprefix("gossip."): n for n in graph.placeholders()
             if str(n.meta.get(STATE, "")).startswith("gossip.")}
    with g.inserting_before(end_of_updates(graph)):
        stored = _flat(g, [graph.final_write(p).args[1] for p in layout.params], Role.OPTIMIZER_UPDATE,
                       "flat_new_param")
        if first:
            start = next(n for n in g.nodes if n.meta.get(_START))
            variables = [("param", stored, start, start)]
        else:
            tracker = graph.last_write(state["tracker"]).args[1]
            variables = [("tracker", tracker, state["tracker_hat"], state["tracker_mix"]),
                         ("param", stored, state["param_hat"], state["param_mix"])]
        _exchange(g, option, layout, variables, state, group, neighbours, weights)
    words_per_message = 2 * layout.k if option.compressor == "top_k" else layout.k
    return 4 * words_per_message * len(variables)


def _exchange(g: fx.Graph, option: Gossip, layout: _Layout, variables: list[tuple], state: dict[str, fx.Node],
              group: str | None, neighbours: list[int], weights: list[float]) -> None:
    """Compress each (key, new value, hat, mix), exchange the messages, and write the new hat and mix."""
    update = Role.OPTIMIZER_UPDATE

    def op(target, *args, name=None, role=update):
        return tag(g.call_function(target, args), role, name=name)

    words, messages = [], []
    for key, value, hat, _ in variables:
        change = op(torch.ops.aten.sub.Tensor, value, hat, name=f"{key}_change")
        if option.compressor == "top_k":
            message = tag(g.call_function(top_k_message, (change,), {"k": layout.k}), update, name=f"{key}_message")
            indices = op(operator.getitem, message, 0, name=f"{key}_indices")
            values = op(operator.getitem, message, 1, name=f"{key}_values")
            words.append(indices)
        else:
            indices, values = None, change
        words.append(tag(g.call_method("view", (values, torch.int32)), update, name=f"{key}_value_bits"))
        messages.append((indices, values))
    received = None
    if neighbours:
        packed = op(torch.cat, words, name="packed_messages")
        received = op(NEIGHBOUR_EXCHANGE, packed, group, neighbours, neighbours, name="received_messages",
                      role=Role.COLLECTIVE)
    offset = 0
    for (key, _, hat, mix), (indices, values) in zip(variables, messages):
        rows_indices = None if indices is None else tag(g.call_method("unsqueeze", (indices, 0)), update,
                                                        name=f"{key}_own_indices")
        rows_values = tag(g.call_method("unsqueeze", (values, 0)), update, name=f"{key}_own_values")
        own = tag(g.call_function(message_sum, (rows_indices, rows_values, [1.0]), {"size": layout.total}),
                  update, name=f"{key}_own_message")
        if received is not None:
            if indices is not None:
                theirs = op(operator.getitem, received, (slice(None), slice(offset, offset + layout.k)),
                            name=f"received_{key}_indices")
                rows_indices = op(torch.cat, [rows_indices, theirs], name=f"{key}_indices_by_worker")
                offset += layout.k
            value_words = op(operator.getitem, received, (slice(None), slice(offset, offset + layout.k)))
            theirs = tag(g.call_method("view", (value_words, torch.float32)), update, name=f"received_{key}_values")
            rows_values = op(torch.cat, [rows_values, theirs], name=f"{key}_values_by_worker")
            offset += layout.k
        mixed = tag(g.call_function(message_sum, (rows_indices, rows_values, weights), {"size": layout.total}),
                    update, name=f"{key}_mixed_messages")
        for target, base, delta, kind in ((state[f"{key}_hat"], hat, own, "hat"),
                                          (state[f"{key}_mix"], mix, mixed, "mix")):
            new_value = op(torch.ops.aten.add.Tensor, base, delta, name=f"new_{key}_{kind}")
            tag(g.call_method("copy_", (target, new_value)), Role.WRITEBACK, state=f"gossip.{key}_{kind}",
                name=f"write_{key}_{kind}")


def _where(option: Gossip) -> tuple[str | None, int, int, list[int], list[float]]:
    group = group_name(option.group)
    me, world = rank(option.group), world_size(option.group)
    neighbours, weights = ring(me, world) if group is not None else ([], [1.0])
    return group, me, world, neighbours, weights


def track_gradients(program: Program, option: Gossip) -> PassResult:
    """COMBINE: the step's averaging removed, the tracked gradient in, the consensus step added."""
    graph = program.graph
    removed = remove_gradient_all_reduces(graph.graph, "Policy(gossip=...)")
    layout = _layout(graph, option)
    _track(graph, option, layout, first="init" in program.events)
    group, me, world, neighbours, _ = _where(option)
    return PassResult(program, (
        f"removed {removed} gradient all-reduce(s)",
        f"{option.topology}: worker {me} of {world}, neighbours {neighbours or 'none (one worker: no exchange)'}",
        f"{option.compressor}: k = {layout.k:,} of {layout.total:,} entries per message",
    ))


class Neighbours(PassRuntime):
    """Counts what `lordo.neighbour_exchange` puts on the wire: its buffer, once per receiver."""

    def collectives(self, graph: TrainGraph) -> list[Collective]:
        return [Collective("neighbour_exchange", "point-to-point", str(node.args[1]), exchange_bytes(node))
                for node in graph.nodes() if node.op == "call_function" and node.target is NEIGHBOUR_EXCHANGE]


@register_pass("gossip", stage=Stage.SYNC, option="gossip", option_type=Gossip, runtime=Neighbours,
               events=lambda option: (INIT,), also={Stage.COMBINE: track_gradients}, conflicts={
                   "data_parallel": WORKERS_COMBINE + ": gossip replaces the gradient all-reduce",
                   "sync": WORKERS_COMBINE + ": gossip replaces periodic averaging",
                   "lordo": WORKERS_COMBINE + ": gossip replaces LoRDO's synchronization",
                   "low_rank_ddp": WORKERS_COMBINE + ": gossip replaces the gradient all-reduce",
               })
def gossip(program: Program, option: Gossip) -> PassResult:
    graph = program.graph
    layout = _layout(graph, option)
    group, _, _, neighbours, weights = _where(option)
    first = "init" in program.events
    sent = _exchange_stored(graph, option, layout, group, neighbours, weights, first)
    return PassResult(program, (
        f"to each neighbour: {sent:,} bytes per step ({'the first step' if first else 'later steps'}); "
        f"beta {option.beta}: " + ("a second forward and backward per step" if option.beta < 1 else "one backward"),))
