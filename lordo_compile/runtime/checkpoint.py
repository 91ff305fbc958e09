"""Checkpoints through `torch.distributed.checkpoint` (DCP): one directory for all workers.

Between syncs every worker's model, optimizer and step state are its own (local SGD,
DiLoCo, LoRDO), so each worker writes its entries under its own key, `rank{r}`: DCP would
otherwise keep one copy of a tensor every rank names alike. Loading reads this worker's
entries back without a template: the structure comes from the checkpoint's metadata,
because a compiled step's own state exists only once it has been captured.

    lc.save_checkpoint(directory, model, opt, step)
    ...
    lc.load_checkpoint(directory, model, opt, step)   # before the step's first call
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ..distributed import world_size


def _rank_and_world() -> tuple[int, int]:
    world = world_size(None)
    return (dist.get_rank() if world > 1 else 0), world


def save_checkpoint(checkpoint_id: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step) -> None:
    """Write this worker's model, optimizer and `step.state_dict()` (collective when
    `torch.distributed` is initialised: every worker calls it)."""
    rank, world = _rank_and_world()
    with step.materialized():
        entries = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step.state_dict()}
        dcp.save({f"rank{rank}": entries}, checkpoint_id=checkpoint_id, no_dist=world == 1)


def load_checkpoint(checkpoint_id: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step) -> None:
    """Load what this worker wrote into `model`, `optimizer` and `step`.

    Raises:
      ValueError: if the checkpoint was written by another number of workers.
    """
    rank, world = _rank_and_world()
    metadata = dcp.FileSystemReader(checkpoint_id).read_metadata()
    saved_world = 1 + max(int(path[0].removeprefix("rank")) for path in metadata.planner_data.values())
    if saved_world != world:
        raise ValueError(
            f"{checkpoint_id} was written by a run of {saved_world} workers; this run has {world}. Resume with "
            f"{saved_world} workers (see docs/reliability.md for changing the number of workers)."
        )
    template: dict[str, Any] = {}
    for key, item in metadata.state_dict_metadata.items():
        path = metadata.planner_data[key]
        if path[0] == f"rank{rank}":
            value = torch.empty(item.size, dtype=item.properties.dtype) if isinstance(item, TensorStorageMetadata) \
                else None
            _place(template, path, value)
    dcp.load(template, checkpoint_id=checkpoint_id, no_dist=world == 1)
    entries = template[f"rank{rank}"]
    # DCP writes every mapping key as a string (torch.optim and the step key their state by
    # int) and leaves out empty containers.
    optimizer_state = dict(entries["optimizer"],
                           state={int(k): v for k, v in entries["optimizer"].get("state", {}).items()})
    runtime = {"tensors": {}, "calls": {}, **entries["step"]["runtime"]}
    adapters = [{int(k): v for k, v in (adapter or {}).items()} for adapter in entries["step"].get("optimizers", [])]
    with step.materialized():
        model.load_state_dict(entries["model"])
    optimizer.load_state_dict(optimizer_state)
    step.load_state_dict({"runtime": runtime, "optimizers": adapters, "passes": entries["step"].get("passes", {})})


def _place(tree: dict, path: tuple, value: Any) -> None:
    """Set tree[path] = value, making the dicts (str keys) and lists (int keys) on the way."""
    node: Any = tree
    for key, child_key in zip(path, path[1:]):
        child = [] if isinstance(child_key, int) else {}
        if isinstance(node, list):
            node.extend([None] * (key + 1 - len(node)))
            node[key] = node[key] if node[key] is not None else child
        else:
            node.setdefault(key, child)
        node = node[key]
    if isinstance(node, list):
        node.extend([None] * (path[-1] + 1 - len(node)))
    node[path[-1]] = value
