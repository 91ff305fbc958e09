"""The process group a step runs in: its functional-collective name and size."""

from __future__ import annotations

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
