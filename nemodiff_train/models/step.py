"""The train step's loss: dataset rows → a noised micro-batch → the joint loss's sums and counts.

:func:`collate` stacks rows of a prepared dataset and noises them, each sample from its own seeded
generator (``core.noising``), so a sample's noise does not depend on batching. :func:`joint_step`
runs one two-stream forward of a :class:`~nemodiff_train.models.hf.DLMModel` over ``[x_t ; x_0]``
and returns :class:`~nemodiff_train.core.losses.LossParts` (docs/method.md, "Loss"). The torch
engine's step, the benchmarks and the tests all call these two functions; the Megatron engine, whose
model computes the per-token cross entropy itself, reduces it with
:func:`nemodiff_train.core.losses.parts_from_token_ce`, the same sums.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..core.losses import LossParts, ar_targets, joint_loss_parts, masked_token_stats
from ..core.noising import NoisedBatch, apply_noise

__all__ = ["MicroBatch", "collate", "joint_step", "noise_settings", "VALIDATION_SEED_OFFSET"]

VALIDATION_SEED_OFFSET = 7919
"""Validation rows are noised with ``run.seed + VALIDATION_SEED_OFFSET`` (fixed noise, apart from the
training noise), by both engines, so their validation losses are comparable."""


@dataclass
class MicroBatch:
    """One micro-batch, noised.

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
    shard: object | None = None
    """A :class:`~nemodiff_train.models.context_parallel.ContextShard` when this rank holds only a slice
    of the rows' positions (context parallelism; :meth:`sharded`), else None."""

    def to(self, device: torch.device) -> "MicroBatch":
        n = self.noise
        return MicroBatch(self.x0.to(device), self.doc_ids.to(device), self.loss_mask.to(device),
                          NoisedBatch(n.noisy_ids.to(device), n.masked.to(device), n.mask_prob.to(device)),
                          self.masked_count, self.ar_count, self.shard)

    def sharded(self, shard) -> "MicroBatch":
        """This micro-batch as one context-parallel rank sees it: the same whole rows and noise (they are
        functions of the whole row), but ``masked_count`` / ``ar_count`` are those of the shard's
        positions, so that summing them over the group gives the rows' counts."""
        stream = shard.split.stream_positions()  # on the CPU, like the counts of collate
        supervised = ar_targets(self.x0, self.loss_mask, self.doc_ids)[1]
        return replace(self, shard=shard, masked_count=int(self.noise.masked[:, stream.to(self.x0.device)].sum()),
                       ar_count=int(supervised[:, stream.to(self.x0.device)].sum()))


def noise_settings(diffusion) -> dict:
    """The noising settings of a run's ``cfg.diffusion``, as :func:`~nemodiff_train.core.noising.apply_noise`
    keywords. Every engine noises through this one mapping, so a setting cannot reach one engine's
    training and miss another's, or its validation (``tests/unit/test_noising.py`` checks it covers
    every setting ``apply_noise`` takes)."""
    names = ("schedule", "eps", "block_size", "half_life_ratio", "keep_block_start", "full_block_fraction")
    return {name: getattr(diffusion, name) for name in names}


def collate(rows: list[dict], sample_indices: list[int], *, seed: int, mask_token_id: int, **noise) -> MicroBatch:
    """Stack dataset rows (``input_ids``, ``doc_ids``, ``loss_mask``) and noise them (on CPU, from
    per-sample generators seeded by ``seed`` and each row's index in ``sample_indices``).

    ``noise``: :func:`~nemodiff_train.core.noising.apply_noise`'s settings (``schedule``, ``eps``, ``block_size``,
    ...; :func:`noise_settings` gives a run's)."""
    x0 = torch.stack([torch.as_tensor(r["input_ids"]) for r in rows]).long()
    docs = torch.stack([torch.as_tensor(r["doc_ids"]) for r in rows]).long()
    loss_mask = torch.stack([torch.as_tensor(r["loss_mask"]) for r in rows]).bool()
    noise = apply_noise(x0, loss_mask, sample_indices, seed=seed, mask_token_id=mask_token_id, doc_ids=docs, **noise)
    ar_count = int(ar_targets(x0, loss_mask, docs)[1].sum())
    return MicroBatch(x0, docs, loss_mask, noise, int(noise.masked.sum()), ar_count)


def joint_step(dlm, mb: MicroBatch, block_size: int, chunk_size: int = 2048, diagnostics: bool = False):
    """The joint loss of one micro-batch: one two-stream forward, then the chunked cross entropies.

    Args:
        dlm: a :class:`~nemodiff_train.models.hf.DLMModel` (``two_stream_hidden`` and ``head``).
        mb: the micro-batch, on the model's device.
        block_size: the training block size B of the attention pattern.
        chunk_size: rows of hidden states per cross-entropy chunk (bounds the ``[n, V]`` logits).
        diagnostics: also return :func:`~nemodiff_train.core.losses.masked_token_stats` of the same
            forward (validation).
    Returns:
        :class:`LossParts` (sums carry the graph), or ``(LossParts, stats)`` with ``diagnostics``.
    """
    hidden = dlm.two_stream_hidden(mb.noise.noisy_ids, mb.x0, mb.doc_ids, block_size)
    parts: LossParts = joint_loss_parts(hidden, dlm.head, mb.x0, mb.noise.masked, mb.noise.mask_prob, mb.loss_mask,
                                        mb.doc_ids, chunk_size)
    if not diagnostics:
        return parts
    return parts, masked_token_stats(hidden, mb.x0, mb.noise.masked, mb.noise.mask_prob, dlm.head,
                                     chunk_size=chunk_size)
