"""The callable dynamo runs: refresh hyperparameters, find the step's events, run their graph.

Each set of events a step can carry has its own graph, compiled the first time a step
carries that set (or all at capture, where the step was captured with symbolic shapes)
and cached. Per call: O(param groups) Python to refresh hyperparameters, one lookup, one
compiled graph, the hooks of the passes that asked for one, and the calls the step makes
outside its graph (a `scheduler.step()` inside it).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils._pytree import tree_map_only

from ..capture.optim import OptimizerAdapter
from ..graph import events_name
from ..logs import emit
from ..lowering import deterministic_algorithms
from ..passes.manager import PassRuntime, Schedule
from .state import RuntimeState


class CollectiveError(RuntimeError):
    """A collective inside the compiled step failed: a peer died, hung, or disconnected."""


class NonFiniteError(FloatingPointError):
    """The loss or a gradient was NaN or infinite; the step was not applied."""


class OptimizerChanged(RuntimeError):
    """An optimizer's structure changed since capture; the step must be captured again."""


@dataclass
class CompiledGraph:
    """One set of events: its state inputs, its collectives, and its compiled function once built."""

    name: str
    state_names: list[str]
    collectives: int
    build: Callable[[tuple], Callable]
    fn: Callable | None = None


class StepExecutor:
    """Runs one captured step. Per call: O(param groups) Python, then one compiled graph."""

    def __init__(
        self,
        graphs: dict[frozenset[str], CompiledGraph],
        schedule: Schedule,
        runtime: RuntimeState,
        adapters: list[OptimizerAdapter],
        pass_runtimes: list[PassRuntime],
        deterministic: bool = True,
        after_call: Sequence[Callable[[], None]] = (),
        cuda_graphs: bool = False,
    ) -> None:
        self.graphs = graphs
        # Calls the step makes outside its graph (a scheduler's step), run eagerly after it.
        self.after_call = list(after_call)
        self.deterministic = deterministic
        self.cuda_graphs = cuda_graphs
        self.log_comm = False
        self.schedule = schedule
        self.runtime = runtime
        self.adapters = adapters
        self.pass_runtimes = pass_runtimes
        self.state_inputs = {events: runtime.inputs(g.state_names) for events, g in graphs.items()}

    def __call__(self, *args):
        for adapter in self.adapters:
            if not adapter.refresh():
                raise OptimizerChanged(
                    f"{type(adapter.optimizer).__name__}: {adapter.structure_change()} after the "
                    "step was captured. lordo_compile.compile() re-captures on its own; with "
                    "torch.compile(backend=...), call torch._dynamo.reset() and compile again."
                )
        events = self.schedule.events_at(self.runtime.step)
        compiled = self.graphs.get(events)
        if compiled is None:
            raise RuntimeError(f"step {self.runtime.step} carries events {sorted(events)}, for which no graph was "
                               "built; this is a bug in lordo_compile's schedule, please report it")
        if compiled.fn is None:
            compiled.fn = compiled.build(args)
        # The hooks raise their own errors (a runtime-issued collective its CollectiveError, the
        # non-finite check read one call late its NonFiniteError); only the graph's are wrapped.
        with contextlib.ExitStack() as stack:
            for hook in self.pass_runtimes:
                context = hook.around_call(events)
                if context is not None:
                    stack.enter_context(context)
            stack.enter_context(deterministic_algorithms(self.deterministic))
            try:
                if self.cuda_graphs:
                    # Each call is one iteration of CUDA graph trees: the last call's outputs
                    # may be overwritten from here on, so they were cloned below.
                    torch.compiler.cudagraph_mark_step_begin()
                out = compiled.fn(*args, *self.state_inputs[events])
                if self.cuda_graphs:
                    out = tree_map_only(torch.Tensor, torch.clone, out)
            except Exception as error:
                if not compiled.collectives:
                    raise
                raise CollectiveError(
                    f"graph {compiled.name!r} at step {self.runtime.step} failed in one of its "
                    f"{compiled.collectives} collective(s): {type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else ''}. A worker has probably died, hung past "
                    "the process group's timeout, or lost its connection; this worker's state may be partly "
                    "updated. Restart every worker from the last checkpoint (model, optimizer and "
                    "step.state_dict())."
                ) from error
        name = events_name(events)
        self.runtime.calls[name] = self.runtime.calls.get(name, 0) + 1
        applied = [hook.after_call(events) for hook in self.pass_runtimes]
        # Also after a skipped step, as a scheduler steps after one GradScaler skips.
        for call in self.after_call:
            call()
        if not all(applied):
            return out
        self.runtime.step += 1
        if self.log_comm and compiled.collectives:
            emit("comm", f"step {self.runtime.step}: graph {name!r} ran {compiled.collectives} collective(s), "
                         f"{self.runtime.calls[name]} run(s) so far")
        return out
