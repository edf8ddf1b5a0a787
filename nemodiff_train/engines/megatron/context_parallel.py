"""Context parallelism for the two-stream row in Megatron's sequence order (pure PyTorch + ``torch.distributed``).

Megatron splits a sequence of S positions over ``cp`` ranks in ``2·cp`` equal chunks and gives rank r
chunks ``r`` and ``2·cp-1-r`` (megatron-core 0.19.2, ``utils._get_batch_on_this_cp_rank_per_sequence_balancing``).
Our sequence is the two-stream row ``[x_t ; x_0]`` (S = 2L), split as one sequence. That order also
balances the two-stream mask: the attention cost of a query rises along each stream (a noisy block
sees its own block plus the clean prefix before it; a clean token sees the clean prefix), so with
S = 2L the chunks ``r`` and ``2cp-1-r`` pair a cheap position with an expensive one of the same
stream profile, and every rank gets about the same number of allowed (query, key) pairs
(docs/long_context.md, "Cost model").

* :func:`cp_positions`: the global positions rank r holds, in its local order;
* :func:`split_for_cp`: a ``[b, S, ...]`` tensor's local slice (what the forward step feeds each rank);
* :func:`local_mask_rows`: the local query rows of the pattern's mask (dense, or a flex ``BlockMask``);
* :func:`gather_for_cp`: the all-gather of a local ``[..., S/cp, ...]`` slice back into global order,
  whose backward reduce-scatters the gradient (each rank gets the sum over ranks of its own slice's
  gradient): the keys and values of the two-stream core attention.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["cp_positions", "split_for_cp", "gather_for_cp", "check_cp_length", "local_mask_rows"]


def check_cp_length(seq_len: int, cp: int) -> None:
    """Megatron's split needs S = 2L divisible by 2·cp, i.e. L divisible by cp."""
    if cp < 1:
        raise ValueError(f"context-parallel size must be >= 1, got {cp}")
    if (2 * seq_len) % (2 * cp):
        raise ValueError(f"the two-stream row 2L = {2 * seq_len} is not divisible by 2·cp = {2 * cp}: "
                         f"seq_len must be a multiple of engine.cp={cp}")


def cp_positions(total: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """``[total / cp]`` int64: the global positions rank ``rank`` holds, chunk ``rank`` then chunk ``2cp-1-rank``."""
    if total % (2 * cp):
        raise ValueError(f"a sequence of {total} positions does not split into 2·cp = {2 * cp} equal chunks")
    if not 0 <= rank < cp:
        raise ValueError(f"rank {rank} is outside 0..{cp - 1}")
    chunk = total // (2 * cp)
    ar = torch.arange(chunk, device=device)
    return torch.cat([rank * chunk + ar, (2 * cp - 1 - rank) * chunk + ar])


def split_for_cp(x: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """The local slice of ``x`` along ``dim`` (Megatron's order); ``cp == 1`` returns ``x``."""
    if cp == 1:
        return x
    return x.index_select(dim, cp_positions(x.shape[dim], cp, rank, device=x.device))


def _global_order(cp: int, chunk: int, device) -> torch.Tensor:
    """Index into the rank-major concatenation of all local slices that yields global order."""
    owner_pos = torch.cat([cp_positions(2 * cp * chunk, cp, r, device) for r in range(cp)])
    return torch.argsort(owner_pos)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group) -> torch.Tensor:
        cp = dist.get_world_size(group)
        ctx.dim, ctx.group, ctx.cp, ctx.rank = dim, group, cp, dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(cp)]
        dist.all_gather(parts, x.contiguous(), group=group)
        local = x.shape[dim]
        order = _global_order(cp, local // 2, x.device)
        ctx.save_for_backward(order)
        return torch.cat(parts, dim=dim).index_select(dim, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (order,) = ctx.saved_tensors
        dim, cp = ctx.dim, ctx.cp
        rank_major = torch.empty_like(grad).index_copy_(dim, order, grad)  # back to rank-major layout
        chunks = [c.contiguous() for c in rank_major.chunk(cp, dim=dim)]
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            out = torch.empty_like(chunks[ctx.rank])
            dist.reduce_scatter(out, chunks, group=ctx.group)
        else:  # gloo has no reduce-scatter: sum everything, keep this rank's part (same result)
            whole = torch.cat(chunks, dim=dim)
            dist.all_reduce(whole, group=ctx.group)
            out = whole.chunk(cp, dim=dim)[ctx.rank].contiguous()
        return out, None, None


def gather_for_cp(x: torch.Tensor, group, dim: int = 2) -> torch.Tensor:
    """All-gather a local slice over the CP ``group`` into global order along ``dim``.

    Args:
        x: the local slice, ``S/cp`` positions along ``dim`` (e.g. keys ``[b, heads, S/cp, hn]``).
        group: the context-parallel process group (None or size 1: ``x`` itself).
    Returns:
        ``S`` positions along ``dim`` in global order; backward reduce-scatters the gradient.
    """
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _GatherSequence.apply(x, dim, group)


def local_mask_rows(pattern, layout, q_positions: torch.Tensor, batch_size: int = 1, *, flex: bool = False,
                    device=None, tile: int = 128):
    """The rows ``q_positions`` of the pattern's ``[S, S]`` mask: what this rank's queries may attend.

    The same predicate as :func:`nemodiff_train.core.masks.dense_mask` / ``flex_block_mask``, evaluated
    at the global query positions only, so a rank never builds the whole ``S x S`` mask.

    Args:
        pattern: a :class:`~nemodiff_train.core.masks.Pattern` (or its name).
        layout: the global :class:`~nemodiff_train.core.masks.SequenceLayout` (L, block size, doc ids).
        q_positions: ``[S/cp]`` int64 global positions of the local queries (:func:`cp_positions`).
        flex: a flex-attention ``BlockMask`` (``Q_LEN = S/cp``, ``KV_LEN = S``) instead of a dense mask.
    Returns:
        dense: ``[b, 1, S/cp, S]`` bool (True = may attend); flex: a ``BlockMask``.
    """
    from ...core.masks import dense_mask, flex_block_mask

    device = torch.device(device) if device is not None else q_positions.device
    if flex:
        return flex_block_mask(pattern, layout, batch_size, device=device, tile=tile, query_index=q_positions)
    return dense_mask(pattern, layout, batch_size, device=device, query_index=q_positions)
