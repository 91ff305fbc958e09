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

import warnings
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

    On another number of workers than wrote it (docs/reliability.md, "Changing the number of
    workers"), the checkpoint must have been taken when every worker held the same model:
    every worker then loads what all writers held alike (the model, replicated optimizer
    and policy state), and state that differed between the writers (each worker's own)
    starts afresh, named in a warning, with the torch.optim state that counts the steps of
    a moment starting afresh.

    Raises:
      ValueError: on another number of workers, if the writers' models differ.
    """
    rank, world = _rank_and_world()
    metadata = dcp.FileSystemReader(checkpoint_id).read_metadata()
    saved_world = 1 + max(int(path[0].removeprefix("rank")) for path in metadata.planner_data.values())
    if saved_world == world:
        entries = _read(checkpoint_id, metadata, [f"rank{rank}"], no_dist=world == 1)[f"rank{rank}"]
        fresh: list[str] = []
    else:
        entries, own_moments, fresh = _alike(checkpoint_id, metadata, saved_world, world)
        own_moments = sorted(set(own_moments) | _counting(entries["step"]["runtime"], fresh,
                                                          _optimizer_names(model, optimizer)))
        _warn_fresh(saved_world, world, model, optimizer, own_moments, fresh)
    # DCP writes every mapping key as a string (torch.optim and the step key their state by
    # int) and leaves out empty containers.
    optimizer_state = dict(entries["optimizer"],
                           state={int(k): v for k, v in entries["optimizer"].get("state", {}).items()})
    if saved_world != world:
        # What the optimizer holds now for a parameter whose state starts afresh: a compiled
        # step has already made it (zeros), and the capture reads it.
        current = optimizer.state_dict()["state"]
        optimizer_state["state"].update({k: current[k] for k in own_moments if k in current})
    runtime = {"tensors": {}, "calls": {}, **entries["step"]["runtime"], "fresh": fresh}
    if saved_world != world and runtime.get("world_size") is not None:
        runtime["world_size"] = world
    adapters = [{int(k): v for k, v in (adapter or {}).items()} for adapter in entries["step"].get("optimizers", [])]
    with step.materialized():
        model.load_state_dict(entries["model"])
    optimizer.load_state_dict(optimizer_state)
    step.load_state_dict({"runtime": runtime, "optimizers": adapters, "passes": entries["step"].get("passes", {})})


def _read(checkpoint_id: str, metadata, prefixes: list[str], no_dist: bool) -> dict[str, Any]:
    """The entries under `prefixes` ("rank0", ...), structured as the checkpoint's metadata says."""
    template: dict[str, Any] = {}
    for key, item in metadata.state_dict_metadata.items():
        path = metadata.planner_data[key]
        if path[0] in prefixes:
            value = torch.empty(item.size, dtype=item.properties.dtype) if isinstance(item, TensorStorageMetadata) \
                else None
            _place(template, path, value)
    with warnings.catch_warnings():  # DCP says no_dist reads "in a single process": each worker reads alone
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(template, checkpoint_id=checkpoint_id, no_dist=no_dist)
    return template


def _alike(checkpoint_id: str, metadata, saved_world: int,
           world: int) -> tuple[dict[str, Any], list[int], list[str]]:
    """Rank 0's entries, less the optimizer and step state that differs between the writers;
    the indices of the parameters whose optimizer state is left out, and the names of the
    step's state tensors left out."""
    # Every worker reads every writer's entries by itself: no collective, whatever the new world.
    writers = _read(checkpoint_id, metadata, [f"rank{r}" for r in range(saved_world)], no_dist=True)
    entries = [writers[f"rank{r}"] for r in range(saved_world)]
    differing = [name for name, value in entries[0]["model"].items()
                 if not all(torch.equal(value, other["model"][name]) for other in entries[1:])]
    if differing:
        raise ValueError(
            f"{checkpoint_id} was written by {saved_world} workers whose models differ ({differing[0]}, ...): it "
            f"was taken while each worker's model was its own, so it cannot resume on {world} workers. Resume with "
            f"{saved_world} workers, or from a checkpoint taken when every worker held the same model (right after "
            "the step that exchanges models). A policy that syncs in fragments (streaming) has no such step: its "
            "checkpoints resume only on the number of workers that wrote them."
        )
    first = entries[0]
    states = [e["optimizer"].get("state", {}) for e in entries]
    own_moments = sorted(k for k in states[0] if not all(_equal(states[0][k], s.get(k)) for s in states[1:]))
    tensors = [e["step"]["runtime"].get("tensors", {}) for e in entries]
    fresh = sorted(name for name in tensors[0] if not all(_equal(tensors[0][name], t.get(name)) for t in tensors[1:]))
    optimizer = dict(first["optimizer"], state={k: v for k, v in states[0].items() if k not in own_moments})
    runtime = dict(first["step"]["runtime"], tensors={k: v for k, v in tensors[0].items() if k not in fresh})
    return dict(first, optimizer=optimizer, step=dict(first["step"], runtime=runtime)), [int(k) for k in own_moments], \
        fresh


def _optimizer_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str | None]:
    """The model's name of each parameter in the optimizer's order (the index its state is
    keyed by); None for one the model does not hold."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names.get(id(p)) for group in optimizer.param_groups for p in group["params"]]


def _counting(runtime: dict, fresh: list[str], names: list[str | None]) -> set[int]:
    """The optimizer indices of parameters whose torch.optim state counts the steps of a moment
    in `fresh` (StateSpec.counted_by_optimizer): a moment that starts afresh with its count
    carried over would be bias-corrected as if it had run all along."""
    counted = runtime.get("counted_by_optimizer", {})
    index = {name: k for k, name in enumerate(names)}
    params = {counted[name] for name in fresh if name in counted}
    unknown = sorted(params - index.keys())
    if unknown:
        raise ValueError(f"the checkpoint's step state counts moments of {unknown}, which are not parameters of both "
                         "the model and the optimizer passed to load_checkpoint: pass the ones the step was compiled "
                         "with")
    return {index[name] for name in params}


def _warn_fresh(saved_world: int, world: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                own_moments: list[int], fresh: list[str]) -> None:
    if not own_moments and not fresh:
        return
    names = _optimizer_names(model, optimizer)
    params = [names[k] or f"parameter {k}" for k in own_moments]
    warnings.warn(
        f"resuming a checkpoint of {saved_world} workers on {world}: state that differed between the workers that "
        f"wrote it starts afresh: torch.optim's state of {params or 'no parameter'}, and the step's "
        f"{fresh or 'no tensor'}. Everything else is what every worker held alike.", UserWarning, stacklevel=3)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


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
