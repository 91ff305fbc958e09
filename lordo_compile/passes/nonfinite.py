"""Non-finite loss or gradients: detected inside the compiled step, the step left undone.

    after (every phase):
        flags = lordo.finite_flags([loss, grad_W0, grad_W1, ...])     # one bool per tensor
        ok = flags.all()
        every writeback  x.copy_(new)  becomes  x.copy_(torch.where(ok, new, x))
        nonfinite_flags.copy_(flags); nonfinite_skipped.copy_(skipped + ~ok)

The gradients checked are those the updates read (after any all-reduce), so under data
parallelism every worker decides the same way. With local steps between syncs (sync, lordo)
only the worker with the bad gradient sees it: "skip" is refused there, and "raise" stops
that worker; the others stop at the next sync (`NonFiniteError`, or `CollectiveError` when
the stopped worker is gone), possibly after averaging in its bad values, so every worker
must restart from the last checkpoint. The runtime reads the flags after each call (one small host read per
step). `on_nonfinite="raise"` raises `NonFiniteError` naming the step and the first bad
tensor; the state is as it was before the step. `"skip"` counts the step in
`nonfinite.skipped`, leaves the step counter (and so the schedule) where it was, warns
once, and training goes on.
"""

from __future__ import annotations

import torch

from ..graph import PARAM, ROLE, Role, StateSpec, TrainGraph, tag
from ..ops.registry import define_aux_op
from .manager import Guard, PassResult, Program, register_pass

MODES = ("raise", "skip")


def finite_flags_math(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.isfinite().all() for t in tensors])


finite_flags = define_aux_op(
    "finite_flags", "(Tensor[] tensors) -> Tensor", finite_flags_math,
    lambda tensors: torch.empty(len(tensors), dtype=torch.bool, device=tensors[0].device),
)


def _guard(graph: TrainGraph) -> tuple[str, ...]:
    g = graph.graph
    output = next(n for n in reversed(g.nodes) if n.op == "output")
    losses = [n for n in g.nodes if n.meta.get(ROLE) == Role.LOSS]
    loss = losses[-1] if losses else output.args[0][0]
    sites = [s for s in graph.updates() if "lr" in s.op.hyperparameters]
    labels = ("loss",) + tuple(f"gradient of {s.param}" for s in sites)
    flags_state = graph.add_state(StateSpec(name="nonfinite.flags", shape=(len(labels),), dtype=torch.bool,
                                            owner="nonfinite", init="ones"))
    skipped = graph.add_state(StateSpec(name="nonfinite.skipped", shape=(), dtype=torch.int64, owner="nonfinite"))
    writebacks = [n for n in g.nodes if n.meta.get(ROLE) == Role.WRITEBACK and n.target == "copy_"]
    anchor = max([loss] + [s.input("grad") for s in sites], key=lambda n: list(g.nodes).index(n))
    with g.inserting_after(anchor):
        flags = tag(g.call_function(finite_flags, ([loss] + [s.input("grad") for s in sites],)),
                      Role.OPTIMIZER_UPDATE, name="finite_flags")
    with g.inserting_after(flags):
        ok = tag(g.call_method("all", (flags,)), Role.OPTIMIZER_UPDATE, name="step_is_finite")
    order = {n: i for i, n in enumerate(g.nodes)}
    for write in writebacks:
        target, new = write.args
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
            kept = g.call_function(torch.where, (ok, new, target))
        kept.meta[ROLE] = Role.OPTIMIZER_UPDATE
        if PARAM in write.meta:
            kept.meta[PARAM] = write.meta[PARAM]
        write.args = (target, kept)
    with g.inserting_before(output):
        tag(g.call_method("copy_", (flags_state, flags)), Role.WRITEBACK, state="nonfinite.flags",
            name="write_finite_flags")
        bad = g.call_function(torch.ops.aten.logical_not.default, (ok,))
        count = g.call_function(torch.ops.aten.add.Tensor, (skipped, bad))
        tag(g.call_method("copy_", (skipped, count)), Role.WRITEBACK, state="nonfinite.skipped", name="count_skipped")
    graph.recompile()
    return labels


@register_pass("nonfinite", option="on_nonfinite",
               after=("data_parallel", "sync", "low_rank", "lordo", "low_rank_ddp", "fake_quant", "eco",
                      "ema_nesterov"))
def nonfinite(program: Program, mode: str) -> PassResult:
    communicates = {phase: any(n.meta.get(ROLE) == Role.COLLECTIVE for n in graph.graph.nodes)
                    for phase, graph in program.phases.items()}
    if mode == "skip" and any(communicates.values()) and not all(communicates.values()):
        # A bad gradient in a local step is seen by one worker only: skipping it there alone
        # would shift that worker's schedule, and its next sync would meet another step's.
        raise ValueError(
            f"on_nonfinite='skip' cannot be used with local steps between syncs (phases "
            f"{sorted(p for p, c in communicates.items() if not c)} communicate nothing, "
            f"{sorted(p for p, c in communicates.items() if c)} do): a worker that skipped a step alone would "
            "fall out of step with the others. Use on_nonfinite='raise' and restart every worker from the last "
            "checkpoint."
        )
    labels = {phase: _guard(graph) for phase, graph in program.phases.items()}
    guard = Guard("nonfinite.flags", tuple(program.phases), labels, skip=mode == "skip")
    return PassResult(Program(program.phases, program.schedule, program.watches, program.stored,
                              program.guards + (guard,)),
                      (f"non-finite loss or gradients: {mode} (state left as before the step)",))
