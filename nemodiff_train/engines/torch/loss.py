"""The torch engine's loss: the joint AR + diffusion loss of one micro-batch, and a seam for more terms.

Two pieces, split by where they run:

* :class:`TwoStreamLoss` (an ``nn.Module``: what DDP / FSDP2 wrap, since their hooks need a
  forward) runs the two-stream forward of a micro-batch, builds a :class:`TwoStreamForward` view of
  it, and returns :class:`StepParts`: the joint loss's sums and counts
  (:func:`~nemodiff_train.core.losses.joint_loss_parts`) plus one ``(sum, count)`` per extra
  :class:`LossTerm`;
* :class:`JointObjective` (the training loop's ``loss_fn``) turns those parts into the scalar each
  micro-batch backpropagates and into the logged losses.

Normalisation (docs/method.md, "Loss"): the joint loss is a global token mean
``(α·Σ CE/p + β·Σ CE_AR) / (N_mask + β·N_AR)`` over the whole optimizer step on every rank; its
denominator is all-reduced *before* the forward. An extra term is its own global mean
``Σ sum_k / Σ count_k`` over the step, weighted by ``term.weight`` and added to the joint loss; its
count must therefore be known before the forward too (:meth:`LossTerm.target_count`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
from torch import nn

from ...core.distill_losses import DistillWeights, Teacher, drafter_kl_positions, joint_and_soft_target_parts
from ...core.losses import LossParts, LossWeights, ar_targets, joint_loss_parts, masked_token_stats
from ...models.attention import DENSE_MASK_IMPLEMENTATIONS
from ...models.hf import DLMModel
from ...models.step import MicroBatch
from .distributed import all_reduce_sum

__all__ = ["TwoStreamForward", "LossTerm", "SoftTargetTerm", "soft_target_terms", "soft_target_weights", "StepParts", "TwoStreamLoss",
           "JointObjective"]


@dataclass
class TwoStreamForward:
    """One micro-batch's two-stream forward: what every loss term reads.

    Attributes:
        dlm: the model (its ``head`` maps ``[n, d]`` hidden states to ``[n, V]`` logits).
        mb: the micro-batch (``x0``, ``noise.masked``, ``noise.mask_prob``, ``loss_mask``,
            ``doc_ids``: ``[m, L]`` each).
        hidden: ``[m, 2L, d]`` final hidden states, noisy stream (the diffusion view, positions
            ``0..L-1``) first, then the clean stream (the AR view, ``L..2L-1``).
        chunk_size: rows per head call that bound the ``[n, V]`` logits (use it for full-vocabulary terms).

    The two views predict the same token at shifted positions: ``noisy_hidden[:, i]`` (where
    ``mb.noise.masked``) and ``clean_hidden[:, i - 1]`` both predict ``x0[:, i]``. So with
    ``sel = mb.noise.masked[:, 1:]`` (restricted further to targets in the same document as the
    position before them, as :func:`~nemodiff_train.core.losses.ar_targets` does), a KL between the
    views compares ``logits(noisy_hidden[:, 1:][sel])`` with ``logits(clean_hidden[:, :-1][sel])``,
    row for row. A term with a frozen teacher runs the teacher on ``mb`` itself, under ``torch.no_grad()``.
    """

    dlm: DLMModel
    mb: MicroBatch
    hidden: torch.Tensor
    chunk_size: int
    soft: DistillWeights | None = None
    """The soft-target terms that are on (``diffusion.drafter_kl`` ...): computed in the same pass over the
    logits as the joint loss (:func:`~nemodiff_train.core.distill_losses.joint_and_soft_target_parts`)."""
    teacher: DLMModel | None = None
    """The frozen base of ``diffusion.teacher_kl``."""
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def noisy_hidden(self) -> torch.Tensor:
        """``[m, L, d]``: the diffusion view (position i predicts the clean token ``x0[:, i]``)."""
        return self.hidden[:, : self._whole_rows()]

    @property
    def clean_hidden(self) -> torch.Tensor:
        """``[m, L, d]``: the AR view (position i predicts ``x0[:, i + 1]``)."""
        return self.hidden[:, self._whole_rows():]

    def _whole_rows(self) -> int:
        if self.mb.shard is not None:
            raise NotImplementedError("a context-parallel rank holds a slice of each row: the views are not whole")
        return self.mb.x0.shape[1]

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """``[n, d]`` selected hidden rows → ``[n, V]`` float32 logits (the model's own head)."""
        return self.dlm.head(rows).float()

    def joint_parts(self) -> LossParts:
        """The joint loss's sums and counts (the method's loss; docs/method.md), computed once."""
        if "joint" not in self._cache:
            mb = self.mb
            if self.soft is None or not self.soft.any:
                positions = None if mb.shard is None else mb.shard.positions  # a context-parallel slice
                self._cache["joint"] = joint_loss_parts(self.hidden, self.dlm.head, mb.x0, mb.noise.masked,
                                                        mb.noise.mask_prob, mb.loss_mask, mb.doc_ids, self.chunk_size,
                                                        positions=positions)
                self._cache["soft"] = {}
            else:
                teacher = None
                if self.soft.teacher_kl > 0:
                    with torch.no_grad():
                        teacher = Teacher(self.teacher.causal_hidden(mb.x0, mb.doc_ids), self.teacher.head)
                self._cache["joint"], self._cache["soft"] = joint_and_soft_target_parts(
                    self.hidden, self.dlm.head, mb.x0, mb.noise.masked, mb.noise.mask_prob, mb.loss_mask, mb.doc_ids,
                    self.soft, teacher, self.chunk_size)
        return self._cache["joint"]

    def soft_target_parts(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{name: (sum, count)}`` of the soft-target terms that are on (the same pass as :meth:`joint_parts`)."""
        self.joint_parts()
        return self._cache["soft"]


class LossTerm(Protocol):
    """An extra loss term (e.g. a KL to a frozen teacher, diffusion view → AR view, an entropy bonus).

    Attributes:
        name: its metrics key is ``<name>_loss`` (the step's global mean ``Σ sum / Σ count``).
        weight: its weight in the objective, ``loss = joint + Σ weight · Σ sum / Σ count``.
    """

    name: str
    weight: float

    def target_count(self, mb: MicroBatch) -> float:
        """The count this term will return for ``mb``, known before the forward (all-reduced with
        the joint denominator, so that every micro-batch's gradient is that of the global mean)."""
        ...

    def __call__(self, fwd: TwoStreamForward) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum, count)`` for one micro-batch: a scalar carrying the graph, and a scalar count."""
        ...


@dataclass
class SoftTargetTerm:
    """One soft-target term (docs/method.md, "Soft-target terms") as a :class:`LossTerm`: a global
    per-position mean over the step, weighted. Its sum comes from the fused pass of
    :meth:`TwoStreamForward.soft_target_parts`.

    Counts (known before the forward): ``drafter_kl`` the masked positions with an AR prediction,
    ``certainty`` all masked positions, ``teacher_kl`` the AR targets.
    """

    name: str
    weight: float

    def target_count(self, mb: MicroBatch) -> float:
        if self.name == "drafter_kl":
            supervised = ar_targets(mb.x0, mb.loss_mask, mb.doc_ids)[1]
            return float(drafter_kl_positions(mb.noise.masked, supervised).sum())
        return float(mb.masked_count if self.name == "certainty" else mb.ar_count)

    def __call__(self, fwd: TwoStreamForward) -> tuple[torch.Tensor, torch.Tensor]:
        return fwd.soft_target_parts()[self.name]


def soft_target_weights(cfg) -> DistillWeights:
    """The soft-target weights of ``cfg.diffusion``."""
    d = cfg.diffusion
    return DistillWeights(d.drafter_kl, d.certainty, d.certainty_temperature, d.teacher_kl)


def soft_target_terms(cfg) -> list[SoftTargetTerm]:
    """The :class:`SoftTargetTerm` of every soft-target weight of ``cfg.diffusion`` that is > 0."""
    return [SoftTargetTerm(name, w) for name, w in soft_target_weights(cfg).terms().items()]


@dataclass
class StepParts(LossParts):
    """:class:`LossParts` of the joint loss plus ``extra``: ``{term name: (sum, count)}``."""

    extra: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def zeros(cls, device, names: Sequence[str] = ()) -> "StepParts":
        def z():
            return torch.zeros((), device=device)
        return cls(z(), z(), z(), z(), {n: (z(), z()) for n in names})

    def __add__(self, other: LossParts) -> "StepParts":
        base = LossParts.__add__(self, other)
        more = getattr(other, "extra", {})
        extra = {k: (s + more[k][0], c + more[k][1]) if k in more else (s, c) for k, (s, c) in self.extra.items()}
        extra.update({k: v for k, v in more.items() if k not in extra})
        return StepParts(base.diffusion_sum, base.diffusion_count, base.ar_sum, base.ar_count, extra)

    def detached(self) -> "StepParts":
        base = LossParts.detached(self)
        return StepParts(base.diffusion_sum, base.diffusion_count, base.ar_sum, base.ar_count,
                         {k: (s.detach(), c.detach()) for k, (s, c) in self.extra.items()})

    def all_reduced(self, device) -> "StepParts":
        """Summed over ranks (one all-reduce of every sum and count)."""
        names = list(self.extra)
        flat = torch.stack([self.diffusion_sum, self.diffusion_count, self.ar_sum, self.ar_count,
                            *(t for n in names for t in self.extra[n])]).float().to(device)
        all_reduce_sum(flat)
        v = flat.unbind()
        return StepParts(*v[:4], {n: (v[4 + 2 * i], v[5 + 2 * i]) for i, n in enumerate(names)})


class TwoStreamLoss(nn.Module):
    """``forward(micro_batch) -> StepParts``: the unit DDP/FSDP wrap (their hooks need a forward).

    ``terms`` (:class:`LossTerm`) run inside the forward, on the same :class:`TwoStreamForward`,
    so FSDP2 has gathered the parameters they need. A term's own frozen modules (a teacher) should
    be registered on it, not here, unless they are meant to be wrapped with the model. ``soft`` and
    ``teacher`` switch on the soft-target terms' fused pass (:class:`SoftTargetTerm` reads it); the
    teacher is held in a tuple so that it is no submodule (DDP / FSDP2 must not wrap the frozen base).
    """

    def __init__(self, dlm: DLMModel, block_size: int, chunk_size: int, terms: Sequence[LossTerm] = (),
                 soft: DistillWeights | None = None, teacher: DLMModel | None = None, skip_unmasked: bool = False):
        super().__init__()
        self.dlm = dlm
        self.block_size = block_size
        self.chunk_size = chunk_size
        self.terms = list(terms)
        self.soft = soft
        self._teacher = (teacher,)
        self.skip_unmasked = skip_unmasked

    def needed_positions(self, mb: MicroBatch) -> torch.Tensor | None:
        """``[m, 2L]`` bool, the positions the loss reads (masked noisy ones, every clean one), when the
        forward may compute only those and what they attend to (``engine.skip_unmasked_blocks``;
        :mod:`nemodiff_train.core.compaction`); None = the whole two-stream row.

        Only where it is known to be exact: a dense-mask attention (sdpa / eager), no context-parallel
        slice, and no loss term but the built-in soft-target ones (which read masked positions only; a
        caller's term may read any noisy position).
        """
        if (not self.skip_unmasked or mb.shard is not None or self.dlm.implementation not in DENSE_MASK_IMPLEMENTATIONS
                or not all(isinstance(t, SoftTargetTerm) for t in self.terms)):
            return None
        masked = mb.noise.masked
        return torch.cat([masked, torch.ones_like(masked)], dim=1)

    def forward(self, mb: MicroBatch, diagnostics: bool = False):
        """:class:`StepParts` of ``mb``; with ``diagnostics`` also its masked-token stats
        (:func:`~nemodiff_train.core.losses.masked_token_stats`; a flag, not a second method, so
        that FSDP's forward hooks gather the parameters)."""
        if mb.shard is not None and (self.terms or (self.soft is not None and self.soft.any)):
            raise NotImplementedError("extra loss terms and soft-target terms are not verified under context "
                                      "parallelism (engine.cp > 1)")
        hidden = self.dlm.two_stream_hidden(mb.noise.noisy_ids, mb.x0, mb.doc_ids, self.block_size, shard=mb.shard,
                                            needed=self.needed_positions(mb))
        fwd = TwoStreamForward(self.dlm, mb, hidden, self.chunk_size, self.soft, self._teacher[0])
        base = fwd.joint_parts()
        parts = StepParts(base.diffusion_sum, base.diffusion_count, base.ar_sum, base.ar_count,
                          {term.name: term(fwd) for term in self.terms})
        if not diagnostics:
            return parts
        x0, masked, prob = mb.x0, mb.noise.masked, mb.noise.mask_prob
        if mb.shard is not None:  # the local hidden states are [its noisy positions ; its clean positions]
            stream = mb.shard.stream_positions
            x0, masked, prob = x0[:, stream], masked[:, stream], prob[:, stream]
        return parts, masked_token_stats(hidden, x0, masked, prob, self.dlm.head, chunk_size=self.chunk_size)


class JointObjective:
    """The training loop's ``loss_fn``: micro-batch parts → the scalar to backpropagate and the metrics.

    Args:
        weights: α and β of the joint loss (``diffusion.alpha``, ``diffusion.beta``).
        terms: the extra terms :class:`TwoStreamLoss` computes (the same objects, same order).
    """

    def __init__(self, weights: LossWeights, terms: Sequence[LossTerm] = ()):
        self.weights = weights
        self.terms = list(terms)

    @classmethod
    def from_config(cls, cfg, terms: Sequence[LossTerm] = ()) -> "JointObjective":
        """The run's objective: ``diffusion.alpha`` / ``diffusion.beta`` and the extra ``terms``
        (build config-selected terms here when the config grows keys for them)."""
        return cls(LossWeights(cfg.diffusion.alpha, cfg.diffusion.beta), terms)

    def local_denominators(self, micro: Sequence[MicroBatch]) -> list[float]:
        """This rank's ``[N_mask + β·N_AR, count of term 1, ...]`` for the step (before any forward)."""
        joint = sum(mb.masked_count + self.weights.beta * mb.ar_count for mb in micro)
        return [joint, *(float(sum(term.target_count(mb) for mb in micro)) for term in self.terms)]

    def backward_scalar(self, parts: StepParts, global_dens: Sequence[float], world: int) -> torch.Tensor:
        """What one micro-batch backpropagates: its share of the global means, times ``world`` (the
        data-parallel gradient average divides by it again)."""
        loss = parts.numerator(self.weights) * (world / global_dens[0])
        for term, den in zip(self.terms, global_dens[1:]):
            loss = loss + term.weight * parts.extra[term.name][0] * (world / max(den, 1.0))
        return loss

    def metrics(self, total: StepParts) -> dict[str, float]:
        """The logged losses of a step's all-reduced parts."""
        w = self.weights
        loss = (total.numerator(w) / total.denominator(w)).item()
        out = {"ar_loss": (total.ar_sum / total.ar_count.clamp_min(1)).item(),
               "diffusion_loss": (total.diffusion_sum / total.diffusion_count.clamp_min(1)).item(),
               "masked_tokens": int(total.diffusion_count.item())}
        for term in self.terms:
            s, c = total.extra[term.name]
            out[f"{term.name}_loss"] = (s / c.clamp_min(1)).item()
            loss += term.weight * out[f"{term.name}_loss"]
        return {"loss": loss, **out}
