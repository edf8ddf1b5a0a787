"""Soft-target terms that keep a conversion close to its base (docs/distill.md, "Loss terms"), as sums.

Three optional terms, each returned as a ``(sum, count)`` pair like the joint loss's parts; the engine
makes each a global per-position mean ``Σ sum / Σ count`` over the optimizer step and adds it with its
weight (``engines/torch/loss.py``), so a weight means the same thing at every batch and world size:

- **drafter KL** ``Σ_{masked i} KL(p_AR(· | x_0[<i]) ‖ p_diff_i)``: pulls each masked position's
  diffusion distribution toward the (detached) AR view's distribution for the same token, which the
  clean stream of the same forward already computes at position ``i - 1``. Self-speculation accepts a
  draft token exactly when the two argmaxes agree, so this trains acceptance directly. Positions whose
  token has no AR prediction (a document's first token) are left out.
- **certainty** ``Σ_{masked i, argmax p_diff_i = x_0[i]} H(softmax(z_i / T))``, counted over all masked
  positions: entropy minimisation on masked positions the diffusion view already gets right
  (dParallel's certainty forcing), so that it is confident where it is right and more positions pass
  the decoding threshold τ in one step.
- **teacher KL** ``Σ_{supervised i} KL(p_teacher(· | x_0[≤i]) ‖ p_AR_i)``: logit distillation of the
  clean stream toward a frozen teacher (the untouched base), on the AR targets that count (the response
  tokens of SFT rows). The teacher's hidden states come from a causal forward the caller runs.

Everything is computed chunk by chunk from hidden states (the ``[n, V]`` logits of one chunk at a time,
recomputed in backward), as :func:`~nemodiff_train.core.losses.weighted_ce_sum` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .losses import LossParts, ar_targets, weighted_ce_sum

__all__ = ["DistillWeights", "Teacher", "MaskedViewSums", "masked_view_sums", "teacher_kl_sum", "kl_rows",
           "entropy_rows", "joint_and_soft_target_parts", "drafter_kl_positions"]

Head = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DistillWeights:
    """Weights of the soft-target terms (0 = off; all 0 = the plain joint loss, bit for bit).

    Attributes:
        drafter_kl: weight of the drafter KL (diffusion view → detached AR view) on masked positions.
        certainty: weight of the certainty (entropy) term on correctly predicted masked positions.
        certainty_temperature: T of the certainty term's ``softmax(z / T)``.
        teacher_kl: weight of the teacher KL (clean stream → frozen teacher) on supervised AR targets.
    """

    drafter_kl: float = 0.0
    certainty: float = 0.0
    certainty_temperature: float = 1.0
    teacher_kl: float = 0.0

    def __post_init__(self) -> None:
        for name in ("drafter_kl", "certainty", "teacher_kl"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.certainty_temperature <= 0:
            raise ValueError(f"certainty_temperature must be > 0, got {self.certainty_temperature}")

    @property
    def on_masked_positions(self) -> bool:
        """Whether any term reads the masked positions' logits (then they are computed in one pass)."""
        return self.drafter_kl > 0 or self.certainty > 0

    @property
    def any(self) -> bool:
        return self.on_masked_positions or self.teacher_kl > 0

    def terms(self) -> dict[str, float]:
        """``{name: weight}`` of the terms that are on, in a fixed order."""
        named = {"drafter_kl": self.drafter_kl, "certainty": self.certainty, "teacher_kl": self.teacher_kl}
        return {k: w for k, w in named.items() if w > 0}


def kl_rows(target_logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``[n, V]`` log-probabilities of the target p and the model q → ``[n]`` KL(p ‖ q) (float32)."""
    return (target_logp.exp() * (target_logp - logq)).sum(-1)


def entropy_rows(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[n, V]`` logits → ``[n]`` entropy of ``softmax(logits / temperature)``."""
    logp = F.log_softmax(logits / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


@dataclass
class MaskedViewSums:
    """What one pass over the masked positions' logits yields (scalars; sums carry the graph).

    Attributes:
        ce_sum: Σ w_i · CE(diffusion logit i, x_0[i]) (the joint loss's diffusion sum, w = 1/p).
        drafter_kl_sum, drafter_kl_count: the drafter KL's sum and its number of positions.
        certainty_sum: the certainty term's entropy sum (its count is the number of masked positions).
    """

    ce_sum: torch.Tensor
    drafter_kl_sum: torch.Tensor
    drafter_kl_count: torch.Tensor
    certainty_sum: torch.Tensor


def _masked_chunk(hidden, targets, ce_weights, ar_hidden, has_ar, head: Head, want_kl: bool, want_certainty: bool,
                  temperature: float):
    logits = head(hidden).float()  # [n, V]
    ce = (F.cross_entropy(logits, targets, reduction="none") * ce_weights).sum()
    zero = logits.new_zeros(())
    kl = certainty = zero
    if want_kl:
        with torch.no_grad():  # the AR view is the target: no gradient flows into it (nor into the head through it)
            ar_logp = F.log_softmax(head(ar_hidden).float(), dim=-1)
        kl = (kl_rows(ar_logp, F.log_softmax(logits, dim=-1)) * has_ar).sum()
    if want_certainty:
        right = (logits.detach().argmax(-1) == targets).float()
        certainty = (entropy_rows(logits, temperature) * right).sum()
    return ce, kl, certainty


def masked_view_sums(hidden: torch.Tensor, targets: torch.Tensor, ce_weights: torch.Tensor, ar_hidden: torch.Tensor,
                     has_ar: torch.Tensor, head: Head, weights: DistillWeights,
                     chunk_size: int = 2048) -> MaskedViewSums:
    """The diffusion cross entropy and the masked-position soft-target terms, from one pass over the logits.

    Args:
        hidden: ``[N, d]`` noisy-stream hidden states of the masked positions.
        targets: ``[N]`` their clean tokens x_0[i].
        ce_weights: ``[N]`` float32 cross-entropy weights (1/p).
        ar_hidden: ``[N, d]`` clean-stream hidden states at i - 1 (the AR view's prediction of x_0[i]);
            read without gradient. Rows where ``has_ar`` is 0 may hold anything.
        has_ar: ``[N]`` float32, 1 where position i has an AR prediction (i > 0, same document).
        head: output head ``[n, d]`` → ``[n, V]``.
        weights: which terms to compute (a term with weight 0 is not computed).
        chunk_size: rows per chunk; each chunk is recomputed in backward.
    Returns:
        :class:`MaskedViewSums`.
    """
    zero = hidden.sum() * 0.0
    sums = [zero, zero, zero]
    needs_grad = torch.is_grad_enabled() and hidden.requires_grad
    flags = (weights.drafter_kl > 0, weights.certainty > 0, weights.certainty_temperature)
    for start in range(0, hidden.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        args = (hidden[sl], targets[sl], ce_weights[sl], ar_hidden[sl].detach(), has_ar[sl], head, *flags)
        if needs_grad and hidden.shape[0] > chunk_size:
            parts = checkpoint(_masked_chunk, *args, use_reentrant=False)
        else:
            parts = _masked_chunk(*args)
        sums = [s + p for s, p in zip(sums, parts)]
    ce, kl, certainty = sums
    return MaskedViewSums(ce, kl, has_ar.sum().float() if flags[0] else zero.detach(), certainty)


def _teacher_chunk(hidden, teacher_hidden, head: Head, teacher_head: Head):
    logq = F.log_softmax(head(hidden).float(), dim=-1)
    with torch.no_grad():
        teacher_logp = F.log_softmax(teacher_head(teacher_hidden).float(), dim=-1)
    return kl_rows(teacher_logp, logq).sum()


def teacher_kl_sum(hidden: torch.Tensor, teacher_hidden: torch.Tensor, head: Head, teacher_head: Head,
                   chunk_size: int = 2048) -> torch.Tensor:
    """Σ_i KL(teacher_i ‖ model_i) over the selected clean-stream positions.

    Args:
        hidden: ``[N, d]`` the model's clean-stream hidden states (with gradient).
        teacher_hidden: ``[N, d_t]`` the frozen teacher's hidden states at the same positions (no gradient).
        head, teacher_head: the two output heads (``[n, d]`` → ``[n, V]``, the same vocabulary).
    Returns:
        scalar float32 sum.
    """
    total = hidden.sum() * 0.0
    needs_grad = torch.is_grad_enabled() and hidden.requires_grad
    for start in range(0, hidden.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        args = (hidden[sl], teacher_hidden[sl].detach(), head, teacher_head)
        if needs_grad and hidden.shape[0] > chunk_size:
            total = total + checkpoint(_teacher_chunk, *args, use_reentrant=False)
        else:
            total = total + _teacher_chunk(*args)
    return total


@dataclass
class Teacher:
    """A frozen teacher's view of the clean stream (the teacher KL's target).

    Attributes:
        hidden: ``[b, L, d_t]`` final hidden states of the teacher's causal forward over x_0 (no gradient).
        head: the teacher's output head, ``[n, d_t]`` → ``[n, V]`` (the model's vocabulary).
    """

    hidden: torch.Tensor
    head: Head


def drafter_kl_positions(masked: torch.Tensor, supervised: torch.Tensor) -> torch.Tensor:
    """``[b, L]`` bool: masked positions i whose token the AR view predicts (its target at i - 1 counts:
    same document, supervised; ``supervised`` from :func:`~nemodiff_train.core.losses.ar_targets`)."""
    has_ar = torch.zeros_like(masked)
    has_ar[:, 1:] = supervised[:, :-1]
    return masked & has_ar


def joint_and_soft_target_parts(hidden: torch.Tensor, head: Head, x0: torch.Tensor, masked: torch.Tensor,
                                mask_prob: torch.Tensor, loss_mask: torch.Tensor, doc_ids: torch.Tensor | None,
                                weights: DistillWeights, teacher: Teacher | None = None,
                                chunk_size: int = 2048) -> tuple[LossParts, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The joint loss's parts and the soft-target terms that are on, from one pass over the logits.

    The same sums as :func:`~nemodiff_train.core.losses.joint_loss_parts` (up to summation order), plus
    ``{name: (sum, count)}`` for each term with a weight > 0: ``drafter_kl`` (count: masked positions
    with an AR prediction), ``certainty`` (count: masked positions) and ``teacher_kl`` (count: AR targets).

    Args:
        hidden: ``[b, 2L, d]`` two-stream hidden states (noisy stream first).
        head: output head, ``[n, d]`` → ``[n, V]``.
        x0, masked, mask_prob, loss_mask: ``[b, L]``; doc_ids: optional ``[b, L]``.
        weights: which terms are on.
        teacher: needed when ``weights.teacher_kl > 0``.
    """
    length = x0.shape[1]
    if hidden.shape[1] != 2 * length:
        raise ValueError(f"hidden has {hidden.shape[1]} positions, expected 2L = {2 * length}")
    noisy_h, clean_h = hidden[:, :length], hidden[:, length:]
    targets, supervised = ar_targets(x0, loss_mask, doc_ids)
    ce_weights = 1.0 / mask_prob[masked].float()
    terms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if weights.on_masked_positions:
        has_ar = drafter_kl_positions(masked, supervised)
        prev_h = torch.cat([clean_h[:, :1], clean_h[:, :-1]], dim=1)  # [b, L, d]: row i holds position i - 1
        view = masked_view_sums(noisy_h[masked], x0[masked], ce_weights, prev_h[masked], has_ar[masked].float(),
                                head, weights, chunk_size)
        diff_sum = view.ce_sum
        if weights.drafter_kl > 0:
            terms["drafter_kl"] = (view.drafter_kl_sum, view.drafter_kl_count)
        if weights.certainty > 0:
            terms["certainty"] = (view.certainty_sum, masked.sum().float())
    else:
        diff_sum = weighted_ce_sum(noisy_h[masked], x0[masked], ce_weights, head, chunk_size)
    ar_sum = weighted_ce_sum(clean_h[supervised], targets[supervised],
                             torch.ones(int(supervised.sum()), device=hidden.device), head, chunk_size)
    if weights.teacher_kl > 0:
        if teacher is None:
            raise ValueError("teacher_kl > 0 needs the teacher's hidden states (teacher=...)")
        terms["teacher_kl"] = (teacher_kl_sum(clean_h[supervised], teacher.hidden[supervised], head, teacher.head,
                                              chunk_size), supervised.sum().float())
    return LossParts(diff_sum, masked.sum().float(), ar_sum, supervised.sum().float()), terms
