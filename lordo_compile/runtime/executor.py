"""The callable dynamo runs: refresh hyperparameters, pick the phase, run its compiled graph."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ..capture.optim import OptimizerAdapter
from ..logs import emit
from ..lowering import deterministic_algorithms
from ..passes import Guard, Schedule, Watch
from .state import RuntimeState


class CollectiveError(RuntimeError):
    """A collective inside the compiled step failed: a peer died, hung, or disconnected."""


class NonFiniteError(FloatingPointError):
    """The loss or a gradient was NaN or infinite; the step was not applied."""


class OptimizerChanged(RuntimeError):
    """An optimizer's structure changed since capture; the step must be captured again."""


@dataclass
class CompiledPhase:
    fn: Callable
    state_names: list[str]
    collectives: int = 0


class StoredWeights:
    """Parameters whose full-precision storage is freed between steps (the graph rebuilds
    them from codes at its start); `allocated()` gives them storage for the duration."""

    def __init__(self, tensors: tuple[torch.Tensor, ...]) -> None:
        self.tensors = tensors
        self.nbytes = [t.untyped_storage().nbytes() for t in tensors]

    @contextlib.contextmanager
    def allocated(self):
        for tensor, nbytes in zip(self.tensors, self.nbytes):
            if tensor.untyped_storage().nbytes() == 0:
                tensor.untyped_storage().resize_(nbytes)
        try:
            yield
        finally:
            for tensor in self.tensors:
                tensor.untyped_storage().resize_(0)


class StepExecutor:
    """Runs one captured step. Per call: O(param groups) Python, then one compiled graph."""

    def __init__(
        self,
        phases: dict[str, CompiledPhase],
        schedule: Schedule,
        runtime: RuntimeState,
        adapters: list[OptimizerAdapter],
        watches: tuple[Watch, ...] = (),
        stored: tuple[torch.Tensor, ...] = (),
        guards: tuple[Guard, ...] = (),
        deterministic: bool = True,
    ) -> None:
        self.phases = phases
        self.deterministic = deterministic
        # Parameters a pass keeps in another form: their storage exists only during a call.
        self.stored = StoredWeights(stored)
        self.log_comm = False
        self.schedule = schedule
        self.runtime = runtime
        self.adapters = adapters
        self.state_inputs = {name: runtime.inputs(p.state_names) for name, p in phases.items()}
        self.watches = {phase: [w for w in watches if phase in w.phases] for phase in phases}
        self.guards = {phase: [g for g in guards if phase in g.phases] for phase in phases}

    def __call__(self, *args):
        for adapter in self.adapters:
            if not adapter.refresh():
                raise OptimizerChanged(
                    f"{type(adapter.optimizer).__name__}: {adapter.structure_change()} after the "
                    "step was captured. lordo_compile.compile() re-captures on its own; with "
                    "torch.compile(backend=...), call torch._dynamo.reset() and compile again."
                )
        phase = self.schedule.phase_at(self.runtime.step)
        compiled = self.phases[phase]
        try:
            with self.stored.allocated(), deterministic_algorithms(self.deterministic):
                out = compiled.fn(*args, *self.state_inputs[phase])
        except Exception as error:
            if not compiled.collectives:
                raise
            raise CollectiveError(
                f"phase {phase!r} at step {self.runtime.step} failed in one of its {compiled.collectives} "
                f"collective(s): {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. "
                "A worker has probably died, hung past the process group's timeout, or lost its connection; "
                "this worker's state may be partly updated. Restart every worker from the last checkpoint "
                "(model, optimizer and step.state_dict())."
            ) from error
        self.runtime.phase_calls[phase] = self.runtime.phase_calls.get(phase, 0) + 1
        for guard in self.guards[phase]:
            flags = self.runtime.tensors[guard.state]
            if bool(flags.all()):
                continue
            first = guard.labels[phase][int((~flags).nonzero()[0])]
            if guard.skip:
                if not self.runtime.warned.get(guard.state):
                    self.runtime.warned[guard.state] = True
                    warnings.warn(f"step {self.runtime.step}: the {first} is not finite; the step was skipped "
                                  "(counted in nonfinite.skipped; warned once)", RuntimeWarning, stacklevel=2)
                return out
            raise NonFiniteError(
                f"step {self.runtime.step} (phase {phase!r}): the {first} is not finite (NaN or inf); the step "
                "was not applied, so parameters and optimizer state are as before it. Lower the learning rate, "
                "check the batch, or use Policy(on_nonfinite='skip') to skip such steps and count them."
            )
        self.runtime.step += 1
        if self.log_comm and compiled.collectives:
            emit("comm", f"step {self.runtime.step}: phase {phase!r} ran {compiled.collectives} collective(s), "
                         f"{self.runtime.phase_calls[phase]} run(s) so far")
        for watch in self.watches[phase]:
            self._check(watch)
        return out

    def _check(self, watch: Watch) -> None:
        count = int(self.runtime.tensors[watch.state].sum())
        seen = self.runtime.counters.get(watch.state, 0)
        self.runtime.counters[watch.state] = count
        if count > seen and not self.runtime.warned.get(watch.state):
            self.runtime.warned[watch.state] = True
            warnings.warn(f"{watch.message} (step {self.runtime.step}, {count} so far; warned once)", RuntimeWarning, stacklevel=3)
