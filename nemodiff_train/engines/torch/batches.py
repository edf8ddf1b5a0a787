"""Which rows each rank reads at each step (the order: :mod:`nemodiff_train.data.order`; the
micro-batch itself: :mod:`nemodiff_train.models.step`).

The global data order of a stage is a sequence of seeded per-epoch permutations of the rows; step k
consumes positions ``[k·G, (k+1)·G)`` of it (G = global batch). Rank r takes the positions with
``j mod world == r`` and cuts them into micro-batches; under context parallelism (``engine.cp``)
``rank`` and ``world`` are the data-parallel ones, and the ranks of a context-parallel group read
the same rows (:mod:`.context`). A sample's noise is seeded by its position in
the global order (plus the stage offset), so the same sample gets the same noise whatever the
world size or micro-batch size, and a resumed run reads exactly what an uninterrupted one would.
"""

from __future__ import annotations

__all__ = ["rank_positions"]


def rank_positions(step: int, global_batch: int, rank: int, world: int, micro: int) -> list[list[int]]:
    """Global-order positions of this rank's micro-batches at ``step``."""
    if global_batch % (world * micro):
        raise ValueError(f"global_batch_size={global_batch} is not a multiple of world_size × micro_batch_size "
                         f"= {world} × {micro} (under engine.cp the data-parallel size: world size / engine.cp)")
    start = step * global_batch
    mine = [p for p in range(start, start + global_batch) if p % world == rank]
    return [mine[i:i + micro] for i in range(0, len(mine), micro)]
