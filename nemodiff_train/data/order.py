"""The global data order of a stage, shared by both engines: position → row index.

Each epoch is a seeded permutation of the rows, derived from (seed, stage index, epoch) only, so the
order does not depend on the world size, the engine or the resume point.
"""

from __future__ import annotations

import torch

from ..core.noising import sample_generator

__all__ = ["GlobalOrder"]


class GlobalOrder:
    """Position → row index of a stage's data stream (epochs of seeded permutations)."""

    def __init__(self, num_rows: int, seed: int, stage_index: int):
        if num_rows <= 0:
            raise ValueError("the training split has no rows")
        self.num_rows = num_rows
        self.seed = seed
        self.stage_index = stage_index
        self._perms: dict[int, torch.Tensor] = {}

    def row(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_rows)
        if epoch not in self._perms:
            gen = sample_generator(self.seed * 1_000_003 + self.stage_index, epoch)
            self._perms = {epoch: torch.randperm(self.num_rows, generator=gen)}  # keep one epoch
        return int(self._perms[epoch][offset])
