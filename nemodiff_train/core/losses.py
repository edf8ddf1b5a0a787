"""Joint AR + masked-diffusion loss (docs/method.md, "Loss"), as sums and counts.

    loss = (α · S_diff + β · S_AR) / (N_mask + β · N_AR)
    S_diff = Σ_{masked i} CE(noisy logit i, x_0[i]) / p_i        (unshifted)
    S_AR   = Σ_{supervised i} CE(clean logit i, x_0[i+1])        (shifted)

Nothing here divides by a count: engines reduce the sums and counts across micro-batches and ranks
and normalise once (a per-sequence mean would change the effective α: docs/method.md, "Loss").

Memory: logits are only computed for the positions that enter the loss (masked noisy positions and
supervised clean positions, not the unmasked noisy half), in chunks whose logits are recomputed in
backward (activation checkpointing), so at a 150k vocabulary no full ``2L × V`` float32 logit tensor
ever exists; at most one ``chunk × V`` float32 block per chunk at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["LossParts", "LossWeights", "weighted_ce_sum", "joint_loss_parts", "ar_targets", "masked_token_stats",
           "MASK_RATE_EDGES"]

# Masking-rate buckets of the validation diagnostics: [0, .25), [.25, .5), [.5, .75), [.75, 1].
MASK_RATE_EDGES = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class LossWeights:
    """α (diffusion weight, NLD ``dlm_loss_weight``) and β (AR weight)."""

    alpha: float = 0.3
    beta: float = 1.0

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0 or self.alpha + self.beta == 0:
            raise ValueError(f"loss weights must be >= 0 and not both 0, got alpha={self.alpha}, beta={self.beta}")


@dataclass
class LossParts:
    """Sums and counts of one micro-batch (scalars; sums carry the graph).

    Attributes:
        diffusion_sum: Σ CE/p over masked positions.
        diffusion_count: N_mask.
        ar_sum: Σ CE over supervised next-token targets.
        ar_count: N_AR.
    """

    diffusion_sum: torch.Tensor
    diffusion_count: torch.Tensor
    ar_sum: torch.Tensor
    ar_count: torch.Tensor

    def numerator(self, w: LossWeights) -> torch.Tensor:
        return w.alpha * self.diffusion_sum + w.beta * self.ar_sum

    def denominator(self, w: LossWeights) -> torch.Tensor:
        return self.diffusion_count + w.beta * self.ar_count

    def __add__(self, other: "LossParts") -> "LossParts":
        return LossParts(self.diffusion_sum + other.diffusion_sum, self.diffusion_count + other.diffusion_count,
                         self.ar_sum + other.ar_sum, self.ar_count + other.ar_count)

    def detached(self) -> "LossParts":
        return LossParts(*(t.detach() for t in (self.diffusion_sum, self.diffusion_count, self.ar_sum, self.ar_count)))


def _chunk_ce(hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
              head: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    logits = head(hidden).float()
    return (F.cross_entropy(logits, targets, reduction="none") * weights).sum()


def weighted_ce_sum(hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                    head: Callable[[torch.Tensor], torch.Tensor], chunk_size: int = 2048) -> torch.Tensor:
    """Σ_i w_i · CE(head(hidden_i), target_i), computed chunk by chunk.

    Args:
        hidden: ``[N, d]`` final hidden states of the selected positions.
        targets: ``[N]`` int64 target ids.
        weights: ``[N]`` float32 per-position weights.
        head: maps ``[n, d]`` → ``[n, V]`` logits (the model's output head).
        chunk_size: rows per chunk; each chunk's logits are recomputed in backward.
    Returns:
        scalar float32 sum (0 with a graph to ``hidden`` when N = 0).
    """
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    total = hidden.new_zeros((), dtype=torch.float32)
    needs_grad = torch.is_grad_enabled() and hidden.requires_grad
    for start in range(0, hidden.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        args = (hidden[sl], targets[sl], weights[sl], head)
        if needs_grad and hidden.shape[0] > chunk_size:
            total = total + checkpoint(_chunk_ce, *args, use_reentrant=False)
        else:
            total = total + _chunk_ce(*args)
    return total


def ar_targets(x0: torch.Tensor, loss_mask: torch.Tensor, doc_ids: torch.Tensor | None = None):
    """Next-token targets of the clean stream and which of them are supervised.

    Args:
        x0: ``[b, L]`` clean ids; loss_mask: ``[b, L]``; doc_ids: optional ``[b, L]``.
    Returns:
        targets ``[b, L]`` (x_0 shifted left, last column arbitrary) and supervised ``[b, L]`` bool:
        position i is supervised iff i < L-1, ``loss_mask[i+1]`` is set and i+1 is in i's document
        (no prediction across a packing boundary).
    """
    targets = torch.zeros_like(x0)
    targets[:, :-1] = x0[:, 1:]
    supervised = torch.zeros_like(x0, dtype=torch.bool)
    supervised[:, :-1] = loss_mask[:, 1:].bool()
    if doc_ids is not None:
        supervised[:, :-1] &= doc_ids[:, 1:] == doc_ids[:, :-1]
    return targets, supervised


def joint_loss_parts(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor,
                     masked: torch.Tensor, mask_prob: torch.Tensor, loss_mask: torch.Tensor,
                     doc_ids: torch.Tensor | None = None, chunk_size: int = 2048,
                     positions: torch.Tensor | None = None) -> LossParts:
    """Loss parts of one two-stream forward, or of the positions of it that one rank holds.

    Args:
        hidden: ``[b, 2L, d]`` final hidden states of ``[x_t ; x_0]`` (noisy stream first), or
            ``[b, n, d]`` those of the row positions ``positions``.
        head: output head, ``[n, d]`` → ``[n, V]``.
        x0: ``[b, L]`` clean ids.
        masked: ``[b, L]`` bool, positions masked in x_t.
        mask_prob: ``[b, L]`` masking probability p (diffusion weight 1/p).
        loss_mask: ``[b, L]`` supervised tokens (AR targets use the mask of the *target* token).
        doc_ids: optional ``[b, L]`` for packed rows.
        positions: optional ``[n]`` int64 indices into the two-stream row ``0..2L-1`` that ``hidden``
            holds (a context-parallel rank's slice, :mod:`.context_split`); targets and counts are
            taken from the whole row, so the ranks' parts add up to the whole row's.
    Returns:
        :class:`LossParts`.
    """
    length = x0.shape[1]
    expected = 2 * length if positions is None else positions.numel()
    if hidden.shape[1] != expected:
        raise ValueError(f"hidden has {hidden.shape[1]} positions, expected {expected} "
                         f"({'2L' if positions is None else 'len(positions)'})")
    ar_next, supervised = ar_targets(x0, loss_mask, doc_ids)
    none = torch.zeros_like(masked, dtype=torch.bool)
    # per row position: its target, its diffusion weight 1/p, and which of the two sums it enters
    targets = torch.cat([x0, ar_next], dim=1)
    weights = torch.cat([1.0 / mask_prob.float(), torch.ones_like(mask_prob, dtype=torch.float32)], dim=1)
    in_diffusion = torch.cat([masked.bool(), none], dim=1)
    in_ar = torch.cat([none, supervised], dim=1)
    if positions is not None:
        targets, weights, in_diffusion, in_ar = (t[:, positions] for t in (targets, weights, in_diffusion, in_ar))
    diff_sum = weighted_ce_sum(hidden[in_diffusion], targets[in_diffusion], weights[in_diffusion], head, chunk_size)
    ar_sum = weighted_ce_sum(hidden[in_ar], targets[in_ar], weights[in_ar], head, chunk_size)
    return LossParts(diff_sum, in_diffusion.sum().float(), ar_sum, in_ar.sum().float())


def parts_from_token_ce(noisy_ce: torch.Tensor, clean_ce: torch.Tensor, masked: torch.Tensor,
                        mask_prob: torch.Tensor, supervised: torch.Tensor) -> LossParts:
    """:class:`LossParts` from per-token cross entropies computed elsewhere (e.g. Megatron's vocab-parallel CE).

    The same sums as :func:`joint_loss_parts`, which computes the cross entropies itself (chunked, only
    at the positions that count).

    Args:
        noisy_ce: ``[b, L]`` CE of each noisy-stream position against its clean token.
        clean_ce: ``[b, L]`` CE of each clean-stream position against the next token.
        masked, mask_prob: ``[b, L]`` as in :func:`joint_loss_parts`.
        supervised: ``[b, L]`` bool, the AR targets that count (:func:`ar_targets`).
    """
    diff_sum = (noisy_ce[masked] / mask_prob[masked].float()).sum()
    ar_sum = clean_ce[supervised].sum()
    return LossParts(diff_sum, masked.sum().float(), ar_sum, supervised.sum().float())


@torch.no_grad()
def masked_token_stats(hidden: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor, mask_prob: torch.Tensor,
                       head: Callable[[torch.Tensor], torch.Tensor], edges: tuple[float, ...] = MASK_RATE_EDGES,
                       chunk_size: int = 2048) -> torch.Tensor:
    """How well the diffusion view fills masks, by masking rate (validation diagnostics).

    Args:
        hidden: ``[b, 2L, d]`` final hidden states of ``[x_t ; x_0]`` (only the noisy half is read).
        x0, masked, mask_prob: ``[b, L]`` as in :func:`joint_loss_parts`.
        head: output head, ``[n, d]`` → ``[n, V]``.
        edges: bucket edges over the masking probability p (the last bucket includes its right edge).
    Returns:
        ``[len(edges) - 1, 3]`` float64: per bucket the unweighted CE sum over masked tokens, the
        number whose argmax equals the clean token, and the number of masked tokens. Sums, so that
        engines can add micro-batches and ranks before dividing.
    """
    length = x0.shape[1]
    noisy_h = hidden[:, :length][masked]
    targets, probs = x0[masked], mask_prob[masked].float()
    n_buckets = len(edges) - 1
    bucket = (torch.bucketize(probs, torch.tensor(edges[1:-1], device=probs.device), right=True)
              .clamp_(0, n_buckets - 1))
    out = torch.zeros(n_buckets, 3, dtype=torch.float64, device=hidden.device)
    for start in range(0, noisy_h.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        logits = head(noisy_h[sl]).float()
        ce = F.cross_entropy(logits, targets[sl], reduction="none").double()
        hit = (logits.argmax(-1) == targets[sl]).double()
        b = bucket[sl]
        out[:, 0].index_add_(0, b, ce)
        out[:, 1].index_add_(0, b, hit)
        out[:, 2].index_add_(0, b, torch.ones_like(ce))
    return out
