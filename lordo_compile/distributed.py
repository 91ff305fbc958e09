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
