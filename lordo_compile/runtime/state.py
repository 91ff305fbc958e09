"""Runtime state: the tensors passes asked for, the step counter, and their checkpoint."""

from __future__ import annotations

from typing import Mapping

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
        # Last value read of each watched counter, and whether it has warned.
        self.counters: dict[str, int] = {}
        self.warned: dict[str, bool] = {}
        # How many times each phase ran (byte accounting multiplies by it).
        self.phase_calls: dict[str, int] = {}
        # Workers in the run, where the step communicates (None where it does not): a
        # checkpoint is only meaningful with the number of workers that wrote it.
        self.world_size: int | None = None

    def allocate(self, specs: Mapping[str, StateSpec], params: Mapping[str, torch.Tensor]) -> None:
        """Create the tensors of specs not yet held; a spec seen again must not change."""
        for name, spec in specs.items():
            if name in self.specs:
                if self.specs[name] != spec:
                    raise ValueError(f"state {name!r} was declared twice with different specs")
                continue
            device = params[spec.param].device if spec.param in params else torch.device("cpu")
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
        self.allocated = True
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.load_state_dict(pending)

    def inputs(self, names: list[str]) -> list[torch.Tensor]:
        return [self.tensors[name] for name in names]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "world_size": self.world_size,
            "phase_calls": dict(self.phase_calls),
            "tensors": {k: v.detach().clone() for k, v in self.tensors.items()},
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
                f"Between syncs every worker's model and state are its own, so they cannot be re-sharded. "
                f"Resume with {saved_world} workers; or, to change the number of workers, take a checkpoint "
                "right after a sync (every worker equal there), load rank 0's model and optimizer state on "
                "every worker, and do not load step.state_dict() (the policy's own state restarts)."
            )
        missing = set(self.tensors) - set(state["tensors"])
        unexpected = set(state["tensors"]) - set(self.tensors)
        if missing or unexpected:
            raise ValueError(
                f"state_dict does not match this compiled step: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}; was it saved from a step with another policy?"
            )
        self.step = int(state["step"])
        self.phase_calls = {k: int(v) for k, v in state.get("phase_calls", {}).items()}
        for name, tensor in state["tensors"].items():
            self.tensors[name].copy_(tensor)
