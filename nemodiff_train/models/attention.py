"""One boolean attention pattern, in the form each transformers attention implementation needs.

transformers hands a prepared 4-D ``attention_mask`` to the attention kernel unchanged, and each
kernel reads it differently:

* ``sdpa`` takes a boolean mask (True = may attend);
* ``eager`` *adds* the mask to the scores (``attn_weights + attention_mask``), so a boolean mask would
  mask nothing: it gets an additive float mask in the model dtype, 0 where allowed and the dtype's most
  negative value elsewhere (transformers' own eager convention; ``exp`` of it is exactly 0, like −inf,
  and a row can never turn into NaN);
* ``flex_attention`` adds a tensor mask too, so it gets a ``BlockMask`` (built from the pattern's
  predicate for training, from the dense boolean mask for decoding).

Any other implementation (flash-attention kernels take no arbitrary mask) is refused by
:func:`check_implementation`. Layers with different sliding windows get a ``{layer type: mask}`` dict,
which transformers' decoders index per layer (``causal_mask_mapping[layer_type]``).
"""

from __future__ import annotations

import torch

__all__ = ["SUPPORTED_IMPLEMENTATIONS", "DENSE_MASK_IMPLEMENTATIONS", "CP_ATTENTION", "CP_EAGER", "MASK_FORM_OF", "UnsupportedModelError",
           "check_implementation", "mask_form", "implementation_form", "dense_block_mask", "window_keep"]

SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")

DENSE_MASK_IMPLEMENTATIONS = ("sdpa", "eager")
"""The implementations that read a dense ``[b, 1, q, k]`` mask (any subset of rows and columns of one is a mask too)."""

CP_ATTENTION = "nemodiff_cp_sdpa"
"""The name :mod:`.context_parallel` registers its attention function under (SDPA over gathered keys)."""

CP_EAGER = "nemodiff_cp_eager"
"""The same over the architecture's own eager attention (soft-capping: Gemma-2)."""

MASK_FORM_OF = {CP_ATTENTION: "sdpa", CP_EAGER: "eager"}
"""Attention functions this toolkit registers with transformers, and the implementation whose masks they
read (the context-parallel attention of :mod:`.context_parallel` is SDPA over gathered keys)."""


class UnsupportedModelError(ValueError):
    """A model (architecture, attention implementation, layer type) this toolkit cannot run correctly."""


def check_implementation(implementation: str | None) -> str:
    """Return ``implementation`` when the two-stream and decoding masks can be expressed for it."""
    if implementation not in SUPPORTED_IMPLEMENTATIONS:
        raise UnsupportedModelError(
            f"attn_implementation={implementation!r} cannot take the two-stream / decoding attention masks "
            f"(arbitrary 4-D masks); use one of {list(SUPPORTED_IMPLEMENTATIONS)}")
    return implementation


def mask_form(implementation: str | None) -> str:
    """The implementation whose mask form ``implementation`` reads (itself, or the one it wraps), checked."""
    return check_implementation(MASK_FORM_OF.get(implementation, implementation))


def dense_block_mask(allowed: torch.Tensor):
    """flex-attention ``BlockMask`` of a dense boolean mask ``[b, 1, q, k]`` (decoding: shapes change every call)."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, _, q, k = allowed.shape
    dense = allowed[:, 0]

    def mask_mod(bi, h, qi, ki):
        return dense[bi, qi, ki]

    return create_block_mask(mask_mod, B=b, H=None, Q_LEN=q, KV_LEN=k, device=allowed.device)


def implementation_form(allowed: torch.Tensor, implementation: str, dtype: torch.dtype):
    """A dense boolean mask ``[b, 1, q, k]`` (True = may attend) in the form ``implementation`` reads.

    Returns:
        the boolean mask itself (sdpa), ``[b, 1, q, k]`` additive float in ``dtype`` (eager), or a
        ``BlockMask`` (flex_attention).
    """
    if allowed.dtype != torch.bool or allowed.dim() != 4:
        raise ValueError(f"expected a [b, 1, q, k] boolean mask, got {tuple(allowed.shape)} {allowed.dtype}")
    check_implementation(implementation)
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    return dense_block_mask(allowed)


def window_keep(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None) -> torch.Tensor | None:
    """Which keys a windowed layer lets each query see: ``pos(q) - pos(k) < window``.

    Args:
        query_positions: ``[b, q]``; key_positions: ``[b, k]`` RoPE positions.
    Returns:
        ``[b, 1, q, k]`` bool, or None for ``window=None`` (no restriction).
    """
    if window is None:
        return None
    return ((query_positions[:, :, None] - key_positions[:, None, :]) < window)[:, None]
