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

The zigzag itself and the differentiable gather are the ones the torch engine uses
(:func:`nemodiff_train.core.context_split.zigzag_positions`,
:func:`nemodiff_train.models.context_parallel.gather_in_row_order`); only the layout differs: the
torch engine cuts each stream, Megatron the whole row.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.distributed as dist

from ...core.context_split import inverse_order, zigzag_positions
from ...models.context_parallel import gather_in_row_order

__all__ = ["cp_positions", "split_for_cp", "gather_for_cp", "check_cp_length", "local_mask_rows"]


def check_cp_length(seq_len: int, cp: int) -> None:
    """Megatron's split needs S = 2L divisible by 2·cp, i.e. L divisible by cp."""
    if cp < 1:
        raise ValueError(f"context-parallel size must be >= 1, got {cp}")
    if (2 * seq_len) % (2 * cp):
        raise ValueError(f"the two-stream row 2L = {2 * seq_len} is not divisible by 2·cp = {2 * cp}: "
                         f"seq_len must be a multiple of engine.cp={cp}")


def cp_positions(total: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """``[total / cp]`` int64: the global positions rank ``rank`` holds of a sequence of ``total`` (the whole
    ``2L`` row, split as one sequence): chunk ``rank`` then chunk ``2cp-1-rank``, Megatron's order."""
    return zigzag_positions(total, cp, rank, device)


def split_for_cp(x: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """The local slice of ``x`` along ``dim`` (Megatron's order); ``cp == 1`` returns ``x``."""
    if cp == 1:
        return x
    return x.index_select(dim, cp_positions(x.shape[dim], cp, rank, device=x.device))


@lru_cache(maxsize=8)
def _orders(total: int, cp: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(to row order, gathered order) of the rank-major concatenation of all ranks' slices; built once per
    shape, not at each of a forward's 2 x layers gathers."""
    gathered = torch.cat([cp_positions(total, cp, r, device) for r in range(cp)])
    return inverse_order(gathered), gathered


def gather_for_cp(x: torch.Tensor, group, dim: int = 2) -> torch.Tensor:
    """All-gather a local slice over the CP ``group`` into global order along ``dim``.

    Args:
        x: the local slice, ``S/cp`` positions along ``dim`` (e.g. keys ``[b, heads, S/cp, hn]``).
        group: the context-parallel process group (None or size 1: ``x`` itself).
    Returns:
        ``S`` positions along ``dim`` in global order; backward reduce-scatters the gradient
        (:func:`nemodiff_train.models.context_parallel.gather_in_row_order`, the torch engine's gather).
    """
    if group is None or dist.get_world_size(group) == 1:
        return x
    cp = dist.get_world_size(group)
    to_row, gathered = _orders(cp * x.shape[dim], cp, x.device)
    return gather_in_row_order(x, group, to_row, gathered, dim)


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
