"""The forward step Megatron-Bridge's ``pretrain`` calls once per micro-batch.

It uses the framework-free core exactly as the torch engine does:

* noise: :func:`nemodiff_train.core.noising.apply_noise`, seeded by (run seed, global sample index),
  so every tensor/pipeline rank of a replica derives the same ``x_t`` without communication, and a
  sample's noise does not depend on world size, micro-batch size or the resume point;
* inputs: :func:`nemodiff_train.core.sequence.two_stream_inputs` (``[x_t ; x_0]``);
* AR targets and which of them count: :func:`nemodiff_train.core.losses.ar_targets`;
* sums and counts: :func:`nemodiff_train.core.losses.parts_from_token_ce` → ``LossParts`` / ``LossWeights``.

Megatron computes the per-token cross entropy itself (vocab-parallel under tensor parallelism) from
``labels = [x_0 ; next-token targets]``: the noisy half predicts its own clean token (unshifted),
the clean half the next one. The loss function then returns Megatron's triple
``(α·S_diff + β·S_AR, N_mask + β·N_AR, report)``; with ``calculate_per_token_loss`` Megatron adds
numerators and counts over micro-batches and data-parallel ranks and divides once (the global
per-token mean of docs/method.md, "Loss"). The report carries ``ar_loss`` (Σ CE / N_AR) and
``diffusion_loss`` (Σ CE/p / N_mask) as (sum, count) pairs, reduced the same way.

Context parallelism: the whole row is noised first (noise and positions are functions of the global
row), then each CP rank keeps its positions of ``[x_t ; x_0]`` in Megatron's order
(:func:`.context_parallel.split_for_cp`): tokens, positions, labels, and the loss masks restricted to
the positions it owns. Each rank's sums and counts cover its own positions only; Megatron adds
numerators, token counts and reports over the data × context-parallel group (``dp_cp``), so the
result is the one-rank step's. A multimodal wrapper (Ministral-3) slices its inputs for CP itself,
after merging image embeddings, with the same Megatron function and order: it gets the whole row,
and the document ids as ``[b, L, 2·cp]`` (equal columns), so that its slice along dimension 2 (what
Megatron does to an ``attention_mask``) leaves every row's ids whole for the attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ...core.losses import LossParts, LossWeights, ar_targets, parts_from_token_ce
from ...core.noising import apply_noise
from ...core.sequence import split_streams, two_stream_inputs
from .context_parallel import check_cp_length, cp_positions, split_for_cp

__all__ = ["TwoStreamForwardStep", "StepBatch", "CPShare", "make_batch", "loss_from_token_ce"]


@dataclass
class StepBatch:
    """One micro-batch on the model's device (with CP: this rank's share of it)."""

    input_ids: torch.Tensor  # [b, 2L/cp]
    position_ids: torch.Tensor  # [b, 2L/cp]
    doc_ids: torch.Tensor  # [b, L], the whole row's (what the two-stream attention receives as `attention_mask`)
    labels: torch.Tensor  # [b, 2L/cp]
    masked: torch.Tensor  # [b, L] bool (with CP: only the noisy positions this rank holds)
    mask_prob: torch.Tensor  # [b, L]
    supervised: torch.Tensor  # [b, L] bool, AR targets that count (with CP: only the clean positions held here)
    local_positions: torch.Tensor | None = None  # [2L/cp] global positions held here (None: no CP)
    attention_mask: torch.Tensor | None = None  # what the model gets as attention_mask (None: doc_ids)

    @property
    def model_attention_mask(self) -> torch.Tensor:
        return self.doc_ids if self.attention_mask is None else self.attention_mask


@dataclass(frozen=True)
class CPShare:
    """This rank's share of a row under context parallelism: ``size`` ranks, this one ``rank``;
    ``model_slices``: the model slices the inputs itself (multimodal wrappers), so they stay whole."""

    size: int = 1
    rank: int = 0
    model_slices: bool = False


def make_batch(sample: dict, *, device: torch.device | str, cp: CPShare = CPShare(), **noise) -> StepBatch:
    """Noise a collated sample dict (``tokens``, ``doc_ids``, ``loss_mask``, ``sample_index``, ``noise_seed``).

    ``noise``: :func:`~nemodiff_train.core.noising.apply_noise`'s settings (``mask_token_id``, ``schedule``,
    ``eps``, ``block_size``, ``half_life_ratio``, ``keep_block_start``); the seed and the rows' indices come
    from the sample. With ``cp.size > 1`` the whole row is noised, then this rank's positions are kept
    (module docstring).
    """
    x0 = sample["tokens"].long().cpu()
    doc = sample["doc_ids"].long().cpu()
    loss_mask = sample["loss_mask"].bool().cpu()
    seeds = sample["noise_seed"].view(-1)
    if not bool((seeds == seeds[0]).all()):
        raise ValueError("a micro-batch mixes noise seeds")
    noise = apply_noise(x0, loss_mask, sample["sample_index"].view(-1), seed=int(seeds[0]), doc_ids=doc, **noise)
    inputs = two_stream_inputs(noise.noisy_ids, x0, doc)
    targets, supervised = ar_targets(x0, loss_mask, doc)
    labels = torch.cat([x0, targets], dim=1)
    masked, local = noise.masked, None
    if cp.size > 1:
        length = x0.shape[1]
        check_cp_length(length, cp.size)
        local = cp_positions(2 * length, cp.size, cp.rank)
        owned = torch.zeros(2 * length, dtype=torch.bool)
        owned[local] = True
        masked, supervised = masked & owned[:length], supervised & owned[length:]
    ids, pos, attn = inputs.input_ids, inputs.position_ids, None
    if cp.size > 1 and cp.model_slices:
        attn = doc.unsqueeze(-1).expand(*doc.shape, 2 * cp.size).contiguous()
    elif cp.size > 1:
        ids, pos, labels = (split_for_cp(t, cp.size, cp.rank) for t in (ids, pos, labels))
    dev = torch.device(device)
    return StepBatch(ids.to(dev), pos.to(dev), doc.to(dev), labels.to(dev), masked.to(dev), noise.mask_prob.to(dev),
                     supervised.to(dev), None if local is None else local.to(dev),
                     None if attn is None else attn.to(dev))


def loss_from_token_ce(token_ce: torch.Tensor, batch: StepBatch) -> LossParts:
    """``[b, 2L/cp]`` per-token CE of ``batch.labels`` → :class:`LossParts` (sums carry the graph).

    With CP the local CEs are placed at their global positions of a ``[b, 2L]`` row; the positions
    held elsewhere are excluded by ``batch.masked`` / ``batch.supervised``.
    """
    token_ce = token_ce.float()
    if batch.local_positions is not None:
        whole = token_ce.new_zeros(token_ce.shape[0], 2 * batch.doc_ids.shape[1])
        token_ce = whole.index_copy(1, batch.local_positions, token_ce)
    noisy_ce, clean_ce = split_streams(token_ce)
    return parts_from_token_ce(noisy_ce, clean_ce, batch.masked, batch.mask_prob, batch.supervised)


class TwoStreamForwardStep:
    """``forward_step(state, data_iterator, model)`` for ``megatron.bridge.training.pretrain``.

    Args:
        alpha, beta: loss weights.
        noise: :func:`~nemodiff_train.core.noising.apply_noise`'s settings from ``cfg.diffusion``
            (``mask_token_id`` required; ``schedule``, ``eps``, ``block_size``, ``half_life_ratio``,
            ``keep_block_start``).
    """

    def __init__(self, *, alpha: float = 0.3, beta: float = 1.0, **noise):
        if "mask_token_id" not in noise:
            raise TypeError("TwoStreamForwardStep needs mask_token_id=")
        self.noise_kw = noise
        self.weights = LossWeights(alpha, beta)
        # Megatron counts tokens in an int tensor: with a fractional beta, scale numerator and count alike
        self.count_scale = 1 if float(beta).is_integer() else 1000

    def __call__(self, state, data_iterator, model, return_schedule_plan: bool = False):
        if return_schedule_plan:
            raise NotImplementedError("combined 1F1B schedule plans are not supported by the two-stream step")
        sample = next(data_iterator)
        device = _device_of(model)
        cp, cp_rank = _context_parallel()
        batch = make_batch(sample, device=device, cp=CPShare(cp, cp_rank, _slices_for_cp(model)), **self.noise_kw)
        _account_flops(state, batch.input_ids, 2 * batch.doc_ids.shape[1])
        out = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                    attention_mask=batch.model_attention_mask, labels=batch.labels)
        if isinstance(out, tuple):  # multimodal wrappers return (output, loss_mask)
            out = out[0]
        return out, partial(self.loss_func, batch)

    def loss_func(self, batch: StepBatch, output_tensor: torch.Tensor):
        parts = loss_from_token_ce(output_tensor, batch)
        num = parts.numerator(self.weights)
        den = parts.denominator(self.weights)
        if not torch.isfinite(num.detach()):
            raise FloatingPointError(f"non-finite loss numerator {float(num)} (diffusion {float(parts.diffusion_sum)}, "
                                     f"AR {float(parts.ar_sum)})")
        scale = self.count_scale
        count = torch.round(den.detach() * scale).to(torch.int)
        report = {
            "lm loss": torch.stack([num.detach(), den.detach()]),
            "ar_loss": torch.stack([parts.ar_sum.detach(), parts.ar_count.detach()]),
            "diffusion_loss": torch.stack([parts.diffusion_sum.detach(), parts.diffusion_count.detach()]),
        }
        return num * scale, count, report


def _context_parallel() -> tuple[int, int]:
    """(size, rank) of Megatron's context-parallel group; (1, 0) before Megatron's parallel state exists."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1, 0
    return parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()


def _slices_for_cp(model) -> bool:
    """Whether the model slices its inputs for CP itself: the multimodal wrappers (a ``language_model``
    inside, e.g. Megatron-Bridge's ``Ministral3Model``) do; Megatron's ``GPTModel`` does not."""
    if isinstance(model, (list, tuple)):
        model = model[0]
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module  # DDP / Float16Module wrappers
    return getattr(model, "language_model", None) is not None


def _device_of(model) -> torch.device:
    if isinstance(model, (list, tuple)):
        model = model[0]
    for p in model.parameters():
        return p.device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _account_flops(state, tokens: torch.Tensor, row_length: int) -> None:
    """Feed Megatron-Bridge's throughput/TFLOPs logging (sequence = the whole 2L row, also under CP); optional."""
    try:
        from megatron.bridge.training.utils.flop_utils import accumulate_flops_metadata
        from megatron.core.utils import get_model_config  # noqa: F401

        accumulate_flops_metadata(state, tokens, vp_stage=None, config_seq_len=row_length)
    except Exception:  # reporting only; older/newer bridges differ
        pass
