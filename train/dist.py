"""Tiny torch.distributed helpers that degrade to single-process no-ops."""
from __future__ import annotations

import torch


def is_enabled() -> bool:
    """True when a process group is initialised."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank (0 without a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if is_enabled() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    import torch.distributed as dist

    return dist.get_world_size() if is_enabled() else 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; identity when single-process."""
    if is_enabled():
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor
