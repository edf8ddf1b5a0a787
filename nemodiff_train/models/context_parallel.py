"""Context-parallel attention for the two-stream row, as an attention function of transformers.

Every rank of a context-parallel (CP) group holds ``2L / cp`` positions of each two-stream row (the
zigzag of :class:`~nemodiff_train.core.context_split.RowSplit`) and the full parameters. The model's
own modules run on the local slice: embeddings, norms and MLPs are per position; RoPE is applied to
the local queries and keys at their GLOBAL position ids. Attention is the only place positions meet:
:func:`cp_sdpa_attention`, registered with transformers' ``AttentionInterface`` as
:data:`CP_ATTENTION`, all-gathers the keys and values of the group (Llama 3's all-gather form), puts
them back in row order and runs SDPA with the local query rows of exactly the mask the one-rank step
uses (documents, sliding windows per layer type, the pattern). :func:`cp_eager_attention`
(:data:`CP_EAGER`) does the same around the architecture's own eager function, for models that need
it (Gemma-2's attention-logit soft-capping). So every architecture that runs through transformers'
attention interface gets CP through its own modules, nothing copied per family.

Backward: the gathered keys' and values' gradients are summed over the group and each rank keeps its
own slice (a reduce-scatter; :class:`_GatherRows`), the transpose of the all-gather.

The shard travels to the attention function as a keyword argument of the decoder's forward
(``context_shard=``), which transformers' decoders hand down to their attention layers unchanged;
activation checkpointing re-runs the layers with the same keyword arguments. Without it (decoding,
a rank-0 probe, export) each function is exactly what it wraps, with the wrapped implementation's masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..core.context_split import RowSplit
from .attention import CP_ATTENTION, CP_EAGER

__all__ = ["CP_ATTENTION", "CP_EAGER", "ContextShard", "cp_sdpa_attention", "cp_eager_attention",
           "register_cp_attention", "use_cp_attention", "gather_rows", "gather_in_row_order", "gathers_so_far"]


_GATHERS = 0
"""Tensors gathered by :meth:`ContextShard.gather` in this process. A module-level count, not a field:
wrappers copy the keyword arguments of a forward (FSDP2's input casting rebuilds dataclasses)."""


def gathers_so_far() -> int:
    """How many key/value tensors this process has gathered (a CP forward gathers two per layer)."""
    return _GATHERS


@dataclass(frozen=True)
class ContextShard:
    """One rank's slice of the two-stream rows of a forward, and its CP group.

    Attributes:
        split: the :class:`RowSplit` (row length, group size, this rank's index).
        group: the CP process group (None: a group of one, for tests of the plumbing).
        positions: ``[2L/cp]`` int64 row positions this rank holds, on the compute device.
        to_row_order: ``[2L]`` int64, indexes the rank-order gather back into row order, on the device.
        gathered_order: ``[2L]`` int64, the inverse: the row position of each rank-order entry.
    """

    split: RowSplit
    group: object
    positions: torch.Tensor
    to_row_order: torch.Tensor
    gathered_order: torch.Tensor

    @classmethod
    def build(cls, split: RowSplit, group, device: torch.device) -> "ContextShard":
        return cls(split, group, split.positions().to(device), split.to_row_order().to(device),
                   split.gathered_order().to(device))

    @property
    def stream_positions(self) -> torch.Tensor:
        """``[L/cp]`` in-stream indices (``0..L-1``) of this rank's noisy (and clean) positions."""
        return self.positions[: self.positions.numel() // 2]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, h, 2L/cp, d]`` local keys or values → ``[b, h, 2L, d]`` of the whole row, in row order."""
        global _GATHERS
        _GATHERS += 1
        return gather_rows(x, self)


class _GatherRows(torch.autograd.Function):
    """All-gather along the sequence axis ``dim`` (forward) / reduce-scatter of the gradient (backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, to_row_order: torch.Tensor, order: torch.Tensor, dim: int) -> torch.Tensor:
        ctx.group, ctx.order, ctx.dim = group, order, dim
        size = dist.get_world_size(group)
        local = x.movedim(dim, 0).contiguous()  # sequence first: the collectives concatenate along dim 0
        out = local.new_empty((size * local.shape[0], *local.shape[1:]))
        dist.all_gather_single(out, local, group=group)
        return out.index_select(0, to_row_order).movedim(0, dim)  # rank order -> row order

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size = dist.get_world_size(ctx.group)
        g = grad.movedim(ctx.dim, 0).index_select(0, ctx.order).contiguous()  # row order -> rank order
        out = g.new_empty((g.shape[0] // size, *g.shape[1:]))
        # each rank's keys were read by every rank's queries: their gradients sum over the group
        dist.reduce_scatter_single(out, g, op=dist.ReduceOp.SUM, group=ctx.group)
        return out.movedim(0, ctx.dim), None, None, None, None


def gather_in_row_order(x: torch.Tensor, group, to_row_order: torch.Tensor, gathered_order: torch.Tensor,
                        dim: int = 2) -> torch.Tensor:
    """All-gather the local slices ``x`` of ``group`` along ``dim`` and put them in row order.

    Args:
        x: this rank's slice, ``n/cp`` positions along ``dim``.
        to_row_order: ``[n]`` int64, indexes the rank-order concatenation into row order.
        gathered_order: ``[n]`` int64, its inverse (the row position of each rank-order entry).
    Returns:
        ``n`` positions along ``dim`` in row order; backward reduce-scatters the gradient (each rank
        gets the sum over the group of its own positions' gradient).
    """
    return _GatherRows.apply(x, group, to_row_order, gathered_order, dim)


def gather_rows(x: torch.Tensor, shard: ContextShard) -> torch.Tensor:
    """:meth:`ContextShard.gather` (differentiable; a group of one returns ``x`` itself)."""
    if shard.split.cp == 1:
        return x
    if x.shape[2] != shard.positions.numel():
        raise ValueError(f"expected {shard.positions.numel()} local positions on dim 2, got {tuple(x.shape)}")
    return gather_in_row_order(x, shard.group, shard.to_row_order, shard.gathered_order)


def _gathered(context_shard: ContextShard, query, key, value, attention_mask, boolean: bool):
    """Keys and values of the whole row, after checking the mask is the local rows' in the expected form."""
    if attention_mask is None or (attention_mask.dtype == torch.bool) != boolean:
        raise ValueError(f"context-parallel attention needs the {'boolean' if boolean else 'additive'} mask of the "
                         "local query rows")
    key, value = context_shard.gather(key), context_shard.gather(value)
    if attention_mask.shape[-2:] != (query.shape[2], key.shape[2]):
        raise ValueError(f"mask {tuple(attention_mask.shape)} does not match {query.shape[2]} local queries "
                         f"× {key.shape[2]} gathered keys")
    return key, value


def cp_sdpa_attention(module, query, key, value, attention_mask, *, context_shard: ContextShard | None = None,
                      **kwargs):
    """transformers attention function: SDPA over the keys and values of the whole row.

    Args:
        query: ``[b, h, 2L/cp, d]`` local queries (RoPE at their global positions).
        key, value: ``[b, h_kv, 2L/cp, d]`` local keys and values.
        attention_mask: ``[b, 1, 2L/cp, 2L]`` boolean, the local query rows of the one-rank mask.
        context_shard: the :class:`ContextShard`; None runs plain SDPA (decoding, probes).
    Returns:
        ``([b, 2L/cp, h, d], None)`` like transformers' SDPA function.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if context_shard is not None:
        if kwargs.get("softcap") is not None:
            raise ValueError("context-parallel SDPA has no attention-logit soft-capping "
                             "(use attn_implementation=eager)")
        key, value = _gathered(context_shard, query, key, value, attention_mask, boolean=True)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _own_eager(module):
    """The architecture's own eager attention function (each transformers modeling file defines one)."""
    import sys

    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise ValueError(f"{type(module).__name__}: its modeling module defines no eager_attention_forward")
    return fn


def cp_eager_attention(module, query, key, value, attention_mask, *, context_shard: ContextShard | None = None,
                       **kwargs):
    """As :func:`cp_sdpa_attention`, over the architecture's own eager attention (soft-capping and all);
    ``attention_mask`` is the additive float form of the local rows."""
    if context_shard is not None:
        key, value = _gathered(context_shard, query, key, value, attention_mask, boolean=False)
    return _own_eager(module)(module, query, key, value, attention_mask, **kwargs)


_WRAPS = {"sdpa": (CP_ATTENTION, cp_sdpa_attention), "eager": (CP_EAGER, cp_eager_attention)}


def register_cp_attention() -> None:
    """Register the context-parallel attention functions (and the mask builders of the implementations
    they wrap) with transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for wrapped, (name, fn) in _WRAPS.items():
        AttentionInterface.register(name, fn)
        if name not in ALL_MASK_ATTENTION_FUNCTIONS:
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[wrapped])


def use_cp_attention(hf) -> None:
    """Switch a loaded SDPA or eager model to its context-parallel function (:data:`CP_ATTENTION`,
    :data:`CP_EAGER`); without a shard it computes exactly what it wraps, with the same masks.

    Raises:
        ValueError: the model runs neither (flex attention is not verified under CP).
    """
    current = getattr(hf.config, "_attn_implementation", None)
    if current in (CP_ATTENTION, CP_EAGER):
        return
    if current not in _WRAPS:
        raise ValueError(f"context parallelism runs on attn_implementation 'sdpa' or 'eager'; "
                         f"the model runs {current!r}")
    register_cp_attention()
    hf.set_attn_implementation(_WRAPS[current][0])
