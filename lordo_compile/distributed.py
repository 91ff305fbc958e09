"""The process group a step runs in: its functional-collective name and size."""

from __future__ import annotations

import os
import warnings

import torch.distributed as dist


def group_name(group) -> str | None:
    """The functional-collective name of `group` (None: WORLD), or None with one worker."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    group = group if group is not None else dist.group.WORLD
    if dist.get_world_size(group) == 1:
        return None
    return group.group_name


def world_size(group) -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group if group is not None else dist.group.WORLD)


def rank(group) -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group if group is not None else dist.group.WORLD)


def check_workers(combining: list[str]) -> None:
    """Passes in `combining` combine workers: without a process group they would run as one
    worker. Raise where torchrun's environment says there are several, else warn."""
    if not combining or (dist.is_available() and dist.is_initialized()):
        return
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if expected > 1:
        raise ValueError(
            f"pass(es) {combining} combine workers and WORLD_SIZE={expected}, but no process group is "
            "initialized: each worker would train alone. Call torch.distributed.init_process_group() "
            "before the step's first call."
        )
    warnings.warn(
        f"pass(es) {combining} combine workers, but no process group is initialized: the step runs as "
        "one worker (nothing is sent). Start it with torchrun and init_process_group() to train with several.",
        UserWarning, stacklevel=4)


def spans_every_worker(name: str) -> bool:
    """Whether the process group named `name` (a functional collective's argument) holds
    every worker."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return dist.get_world_size(_resolve_process_group(name)) == dist.get_world_size()


def levels(mesh) -> tuple[object, object]:
    """(inner, outer) process groups of a 2-D arrangement of the workers: a `DeviceMesh` of two
    dimensions (the last is inner: neighbouring ranks, one node's fast links), or the pair
    itself."""
    if hasattr(mesh, "get_group") and hasattr(mesh, "ndim"):
        if mesh.ndim != 2:
            raise ValueError(f"mesh= must have two dimensions (outer, inner), got a DeviceMesh of {mesh.ndim}")
        return mesh.get_group(1), mesh.get_group(0)
    if not isinstance(mesh, (tuple, list)) or len(mesh) != 2:
        raise ValueError(f"mesh= must be a 2-D DeviceMesh or an (inner, outer) pair of process groups, got {mesh!r}")
    return tuple(mesh)


def two_levels(inner, outer) -> bool:
    """Whether `inner` (combined every step) and `outer` (combined every H steps) are the two
    levels of one 2-D arrangement of the workers: every worker is in one group of each, and
    a group of one level meets a group of the other in one worker.

    False where both are the default group (one level); ValueError where they are set and
    are not two levels (which would leave some workers never combined, or combined twice)."""
    if inner is None and outer is None:
        return False
    if inner is None or outer is None or inner is outer:
        raise ValueError(
            "two passes that combine workers meet only over the two levels of a 2-D arrangement of the workers: "
            "give the every-step pass the inner group and the periodic one the outer group (see "
            f"docs/multi_node.md); got inner={inner!r}, outer={outer!r}"
        )
    if not dist.is_available() or not dist.is_initialized():
        return True
    me = dist.get_rank()
    inner_ranks, outer_ranks = set(dist.get_process_group_ranks(inner)), set(dist.get_process_group_ranks(outer))
    if inner_ranks & outer_ranks != {me} or len(inner_ranks) * len(outer_ranks) != dist.get_world_size():
        raise ValueError(
            f"the inner group (ranks {sorted(inner_ranks)}) and the outer group (ranks {sorted(outer_ranks)}) of "
            f"worker {me} are not two levels of a 2-D arrangement of the {dist.get_world_size()} workers: they must "
            "meet in this worker alone, and their sizes multiply to the world size. Build them with "
            "torch.distributed.device_mesh.init_device_mesh(device, (outer, inner)) and pass mesh=."
        )
    return True
