"""Which rows each rank reads at each step, and how a micro-batch is noised.

The global data order of a stage is a sequence of seeded per-epoch permutations of the rows; step k
consumes positions ``[k·G, (k+1)·G)`` of it (G = global batch). Rank r takes the positions with
``j mod world == r`` and cuts them into micro-batches. A sample's noise is seeded by its position in
the global order (plus the stage offset), so the same sample gets the same noise whatever the
world size or micro-batch size, and a resumed run reads exactly what an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.losses import ar_targets
from ...core.noising import NoisedBatch, apply_noise
from ...data.order import GlobalOrder  # noqa: F401  (the trainer and existing imports use it from here)

__all__ = ["GlobalOrder", "MicroBatch", "rank_positions", "collate"]


def rank_positions(step: int, global_batch: int, rank: int, world: int, micro: int) -> list[list[int]]:
    """Global-order positions of this rank's micro-batches at ``step``."""
    if global_batch % (world * micro):
        raise ValueError(f"global_batch_size={global_batch} is not a multiple of world_size × micro_batch_size "
                         f"= {world} × {micro}")
    start = step * global_batch
    mine = [p for p in range(start, start + global_batch) if p % world == rank]
    return [mine[i:i + micro] for i in range(0, len(mine), micro)]


@dataclass
class MicroBatch:
    """One micro-batch, noised, on the training device.

    Attributes:
        x0, doc_ids, loss_mask: ``[m, L]`` clean ids, document ids, supervised tokens.
        noise: :class:`NoisedBatch` (x_t, masked, mask_prob), ``[m, L]`` each.
        masked_count, ar_count: diffusion and AR target counts (the step's loss denominator),
            counted once on the CPU when the batch is made.
    """

    x0: torch.Tensor
    doc_ids: torch.Tensor
    loss_mask: torch.Tensor
    noise: NoisedBatch
    masked_count: int
    ar_count: int

    def to(self, device: torch.device) -> "MicroBatch":
        n = self.noise
        return MicroBatch(self.x0.to(device), self.doc_ids.to(device), self.loss_mask.to(device),
                          NoisedBatch(n.noisy_ids.to(device), n.masked.to(device), n.mask_prob.to(device)),
                          self.masked_count, self.ar_count)


def collate(rows: list[dict], sample_indices: list[int], *, seed: int, mask_token_id: int, schedule: str,
            eps: float, block_size: int, half_life_ratio: float) -> MicroBatch:
    """Stack dataset rows and noise them (on CPU, from per-sample generators)."""
    x0 = torch.stack([torch.as_tensor(r["input_ids"]) for r in rows]).long()
    docs = torch.stack([torch.as_tensor(r["doc_ids"]) for r in rows]).long()
    loss_mask = torch.stack([torch.as_tensor(r["loss_mask"]) for r in rows]).bool()
    noise = apply_noise(x0, loss_mask, sample_indices, seed=seed, mask_token_id=mask_token_id, schedule=schedule,
                        eps=eps, block_size=block_size, half_life_ratio=half_life_ratio, doc_ids=docs)
    ar_count = int(ar_targets(x0, loss_mask, docs)[1].sum())
    return MicroBatch(x0, docs, loss_mask, noise, int(noise.masked.sum()), ar_count)
