"""Runtime state: the tensors passes asked for, the step counter, and their checkpoint."""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from ..graph import StateSpec


class RuntimeState:
    """Owns every tensor a pass declared, allocated once from its `StateSpec`."""

    def __init__(self) -> None:
        self.step = 0
        self.specs: dict[str, StateSpec] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self._pending: Mapping | None = None
        self.allocated = False
        # How many times each graph (set of events) ran: byte accounting multiplies by it.
        self.calls: dict[str, int] = {}
        # Workers in the run, where the step communicates (None where it does not): a
        # checkpoint is only meaningful with the number of workers that wrote it.
        self.world_size: int | None = None

    def allocate(self, specs: Mapping[str, StateSpec], params: Mapping[str, torch.Tensor],
                 setup: Callable[[set[str]], None], device: torch.device) -> None:
        """Create the tensors of specs not yet held (a spec seen again must not change), run
        `setup` with the names just created (the passes' own initialisation), then make the
        "same:" copies. State of no one parameter (flags, payloads, counters) goes on `device`,
        the graph's: on a GPU a CPU tensor in the graph would cost a copy and a wait per step."""
        fresh = {name: spec for name, spec in specs.items() if name not in self.specs or self.specs[name] != spec}
        for name, spec in fresh.items():
            held = self.specs.get(name)
            if held is not None and not (held.holds == spec.holds == "scratch"):
                raise ValueError(
                    f"state {name!r} of pass {spec.owner!r} was {tuple(held.shape)} {held.dtype} and is now declared "
                    f"{tuple(spec.shape)} {spec.dtype}: the step was captured again over other parameters (a layer "
                    f"frozen or unfrozen?), and this state covers them together, so it cannot follow. Freeze or "
                    f"unfreeze before the first call, or compile a new step (its state starts afresh)."
                )
        for name, spec in fresh.items():
            if not spec.init.startswith("same:"):
                self._create(name, spec, params, device)
        setup(set(fresh))
        for name, spec in fresh.items():
            if spec.init.startswith("same:"):
                source = spec.init.removeprefix("same:")
                if source not in self.tensors:
                    raise ValueError(f"state {name!r} copies {source!r}, which no pass declared")
                self.specs[name] = spec
                self.tensors[name] = self.tensors[source].detach().clone().reshape(spec.shape)
        self.allocated = True
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.load_state_dict(pending)

    def _create(self, name: str, spec: StateSpec, params: Mapping[str, torch.Tensor], device: torch.device) -> None:
        if spec.param in params:
            device = params[spec.param].device
        if spec.init == "zeros":
            tensor = torch.zeros(spec.shape, dtype=spec.dtype, device=device)
        elif spec.init == "ones":
            tensor = torch.ones(spec.shape, dtype=spec.dtype, device=device)
        elif spec.init == "eye":
            tensor = torch.eye(*spec.shape, dtype=spec.dtype, device=device)
        elif spec.init.startswith("randn:"):
            generator = torch.Generator().manual_seed(int(spec.init.removeprefix("randn:")))
            tensor = torch.randn(spec.shape, generator=generator, dtype=spec.dtype).to(device)
        elif spec.init.startswith("copy:"):
            source = params[spec.init.removeprefix("copy:")]
            tensor = source.detach().to(spec.dtype).clone().reshape(spec.shape)
        else:
            raise ValueError(f"state {name!r} has an unknown init rule {spec.init!r}")
        self.specs[name] = spec
        self.tensors[name] = tensor

    def inputs(self, names: list[str]) -> list[torch.Tensor]:
        return [self.tensors[name] for name in names]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "world_size": self.world_size,
            "calls": dict(self.calls),
            "tensors": {k: v.detach().clone() for k, v in self.tensors.items()},
            # Which parameter's torch.optim state counts each moment's steps (StateSpec), for a
            # checkpoint that starts moments afresh.
            "counted_by_optimizer": {name: spec.param for name, spec in self.specs.items()
                                     if spec.counted_by_optimizer and name in self.tensors},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Load a checkpoint; before the first call, it is applied once state is allocated.

        Raises:
          ValueError: if the checkpoint holds other state tensors, or was written by a run
            with another number of workers. Nothing is loaded then.
        """
        if not self.allocated:
            self._pending = state
            return
        saved_world = state.get("world_size")
        if self.world_size is not None and saved_world is not None and saved_world != self.world_size:
            raise ValueError(
                f"this checkpoint was written by a run of {saved_world} workers; this run has {self.world_size}. "
                f"Each worker's model and state may be its own, so they cannot be re-sharded from one worker's "
                f"state_dict. Resume with {saved_world} workers; or, to change the number of workers, save with "
                "lc.save_checkpoint at a step where every worker holds the same model and load with "
                "lc.load_checkpoint, which carries over what every worker held alike (docs/reliability.md)."
            )
        # "fresh": tensors a checkpoint of another number of workers does not carry over
        # (runtime/checkpoint.py), which stay as allocated.
        missing = set(self.tensors) - set(state["tensors"]) - set(state.get("fresh", ()))
        unexpected = set(state["tensors"]) - set(self.tensors)
        if missing or unexpected:
            raise ValueError(
                f"state_dict does not match this compiled step: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}; was it saved from a step with another policy?"
            )
        wrong = [f"'{name}': saved {tuple(tensor.shape)} {tensor.dtype}, this step holds "
                 f"{tuple(self.tensors[name].shape)} {self.tensors[name].dtype}"
                 for name, tensor in state["tensors"].items()
                 if tuple(tensor.shape) != tuple(self.tensors[name].shape) or not torch.can_cast(tensor.dtype, self.tensors[name].dtype)]
        if wrong:
            # copy_ would broadcast a [1, n] tensor into [m, n] and train on from it.
            raise ValueError(
                f"state_dict does not match this compiled step: {'; '.join(wrong)}. Was it saved from a model "
                "of another size, or with other policy options (rank, format)?"
            )
        self.step = int(state["step"])
        self.calls = {k: int(v) for k, v in state.get("calls", {}).items()}
        for name, tensor in state["tensors"].items():
            self.tensors[name].copy_(tensor)
