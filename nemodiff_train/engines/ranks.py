"""This process's rank and the world size, with or without a process group: one definition for both engines.

With a process group they are the group's; before one exists (the Megatron engine prepares data
before ``pretrain`` starts it, and returns after destroying it) they are the launcher's ``RANK`` /
``WORLD_SIZE`` (``torchrun``), and ``0`` / ``1`` in a plain process.
"""

from __future__ import annotations

import os

import torch.distributed as dist

__all__ = ["rank", "world_size"]


def rank() -> int:
    """The global rank."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of processes."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
