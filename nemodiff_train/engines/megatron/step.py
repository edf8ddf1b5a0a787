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
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ...core.losses import LossParts, LossWeights, ar_targets, parts_from_token_ce
from ...core.noising import apply_noise
from ...core.sequence import split_streams, two_stream_inputs

__all__ = ["TwoStreamForwardStep", "StepBatch", "make_batch", "loss_from_token_ce"]


@dataclass
class StepBatch:
    """One micro-batch on the model's device."""

    input_ids: torch.Tensor  # [b, 2L]
    position_ids: torch.Tensor  # [b, 2L]
    doc_ids: torch.Tensor  # [b, L]  (what the two-stream attention receives as `attention_mask`)
    labels: torch.Tensor  # [b, 2L]
    masked: torch.Tensor  # [b, L] bool
    mask_prob: torch.Tensor  # [b, L]
    supervised: torch.Tensor  # [b, L] bool, AR targets that count


def make_batch(sample: dict, *, mask_token_id: int, schedule: str, eps: float, block_size: int,
               half_life_ratio: float, device: torch.device | str) -> StepBatch:
    """Noise a collated sample dict (``tokens``, ``doc_ids``, ``loss_mask``, ``sample_index``, ``noise_seed``)."""
    x0 = sample["tokens"].long().cpu()
    doc = sample["doc_ids"].long().cpu()
    loss_mask = sample["loss_mask"].bool().cpu()
    seeds = sample["noise_seed"].view(-1)
    if not bool((seeds == seeds[0]).all()):
        raise ValueError("a micro-batch mixes noise seeds")
    noise = apply_noise(x0, loss_mask, sample["sample_index"].view(-1), seed=int(seeds[0]), mask_token_id=mask_token_id,
                        schedule=schedule, eps=eps, block_size=block_size, half_life_ratio=half_life_ratio,
                        doc_ids=doc)
    inputs = two_stream_inputs(noise.noisy_ids, x0, doc)
    targets, supervised = ar_targets(x0, loss_mask, doc)
    labels = torch.cat([x0, targets], dim=1)
    dev = torch.device(device)
    return StepBatch(inputs.input_ids.to(dev), inputs.position_ids.to(dev), doc.to(dev), labels.to(dev),
                     noise.masked.to(dev), noise.mask_prob.to(dev), supervised.to(dev))


def loss_from_token_ce(token_ce: torch.Tensor, batch: StepBatch) -> LossParts:
    """``[b, 2L]`` per-token CE of ``batch.labels`` → :class:`LossParts` (sums carry the graph)."""
    noisy_ce, clean_ce = split_streams(token_ce.float())
    return parts_from_token_ce(noisy_ce, clean_ce, batch.masked, batch.mask_prob, batch.supervised)


class TwoStreamForwardStep:
    """``forward_step(state, data_iterator, model)`` for ``megatron.bridge.training.pretrain``.

    Args:
        mask_token_id, schedule, eps, block_size, half_life_ratio: noising (``cfg.diffusion``).
        alpha, beta: loss weights.
    """

    def __init__(self, *, mask_token_id: int, schedule: str = "uniform", eps: float = 1e-3, block_size: int = 64,
                 half_life_ratio: float = 0.25, alpha: float = 0.3, beta: float = 1.0):
        self.noise_kw = dict(mask_token_id=mask_token_id, schedule=schedule, eps=eps, block_size=block_size,
                             half_life_ratio=half_life_ratio)
        self.weights = LossWeights(alpha, beta)
        # Megatron counts tokens in an int tensor: with a fractional beta, scale numerator and count alike
        self.count_scale = 1 if float(beta).is_integer() else 1000

    def __call__(self, state, data_iterator, model, return_schedule_plan: bool = False):
        if return_schedule_plan:
            raise NotImplementedError("combined 1F1B schedule plans are not supported by the two-stream step")
        sample = next(data_iterator)
        device = _device_of(model)
        batch = make_batch(sample, device=device, **self.noise_kw)
        _account_flops(state, batch.input_ids)
        out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.doc_ids,
                    labels=batch.labels)
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


def _device_of(model) -> torch.device:
    if isinstance(model, (list, tuple)):
        model = model[0]
    for p in model.parameters():
        return p.device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _account_flops(state, tokens: torch.Tensor) -> None:
    """Feed Megatron-Bridge's throughput/TFLOPs logging (sequence = 2L tokens); optional."""
    try:
        from megatron.bridge.training.utils.flop_utils import accumulate_flops_metadata
        from megatron.core.utils import get_model_config  # noqa: F401

        accumulate_flops_metadata(state, tokens, vp_stage=None, config_seq_len=tokens.shape[1])
    except Exception:  # reporting only; older/newer bridges differ
        pass
