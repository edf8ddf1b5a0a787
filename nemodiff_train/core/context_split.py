"""How a two-stream row ``[x_t ; x_0]`` is split across the ranks of a context-parallel group.

Each of the ``cp`` ranks holds ``2L / cp`` of the row's ``2L`` positions. The split is a zigzag per
stream: each stream (noisy ``0..L-1``, clean ``L..2L-1``) is cut into ``2·cp`` equal chunks and rank
``r`` keeps chunks ``r`` and ``2·cp - 1 - r`` of both. Why (docs/context_parallel.md, "Cost model"):
under the two-stream pattern a noisy query in block b attends to its own block and the clean blocks
before b, and a clean query attends to the clean positions up to it, so in both streams the number of
keys a query sees grows linearly with its position in the stream. Pairing an early chunk with the
mirrored late chunk gives every rank the same share of (query, key) pairs; contiguous slices would
give the last rank almost twice the average.

A rank's positions are listed noisy chunks first, then clean chunks, each in increasing order, so its
``[b, 2L/cp, d]`` hidden states are ``[its noisy positions ; its clean positions]``, a two-stream row
in miniature: the first ``L/cp`` rows are diffusion-view positions, the rest AR-view positions.

Pure PyTorch (no ``torch.distributed``): the gather across ranks is
:mod:`nemodiff_train.models.context_parallel`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RowSplit", "zigzag_chunks", "zigzag_positions", "inverse_order"]


def zigzag_chunks(cp: int, rank: int) -> tuple[int, int]:
    """The two chunk indices (out of ``2·cp`` per stream) rank ``rank`` keeps: ``rank`` and ``2·cp-1-rank``."""
    if not 0 <= rank < cp:
        raise ValueError(f"rank {rank} is outside a context-parallel group of {cp}")
    return rank, 2 * cp - 1 - rank


def zigzag_positions(length: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """``[length/cp]`` int64: the positions of a sequence of ``length`` that rank ``rank`` keeps when it is
    cut into ``2·cp`` equal chunks (chunk ``rank``, then chunk ``2·cp-1-rank``). The torch engine applies
    it to each stream (:class:`RowSplit`), the Megatron engine to the whole ``2L`` row (Megatron's order).

    Raises:
        ValueError: ``length`` not divisible by ``2·cp``, or ``rank`` outside the group.
    """
    if length % (2 * cp):
        raise ValueError(f"a sequence of {length} positions does not split into 2·cp = {2 * cp} equal chunks")
    first, second = zigzag_chunks(cp, rank)
    chunk = length // (2 * cp)
    ar = torch.arange(chunk, device=device)
    return torch.cat([first * chunk + ar, second * chunk + ar])


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """The inverse permutation of ``[n]`` ``order``: ``order[inverse_order(order)] == arange(n)``."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


@dataclass(frozen=True)
class RowSplit:
    """One rank's share of a two-stream row of ``2·seq_len`` positions.

    Attributes:
        seq_len: L, the length of one stream.
        cp: the context-parallel group size.
        rank: this rank's index in the group.
    Raises:
        ValueError: ``seq_len`` not divisible by ``2·cp`` (the zigzag needs equal chunks).
    """

    seq_len: int
    cp: int
    rank: int

    def __post_init__(self) -> None:
        if self.cp < 1:
            raise ValueError(f"context-parallel size must be >= 1, got {self.cp}")
        zigzag_chunks(self.cp, self.rank)
        if self.seq_len % (2 * self.cp):
            raise ValueError(f"a stream of {self.seq_len} positions cannot be split into 2·cp = {2 * self.cp} equal "
                             "chunks (context parallelism needs data.seq_len divisible by 2·engine.cp)")

    @property
    def chunk(self) -> int:
        """Positions per chunk, ``L / (2·cp)``."""
        return self.seq_len // (2 * self.cp)

    @property
    def local_len(self) -> int:
        """Positions this rank holds, ``2L / cp`` (half noisy, half clean)."""
        return 2 * self.seq_len // self.cp

    def stream_positions(self, rank: int | None = None) -> torch.Tensor:
        """``[L/cp]`` int64: the in-stream indices (``0..L-1``) rank ``rank`` (default: this one) keeps."""
        return zigzag_positions(self.seq_len, self.cp, self.rank if rank is None else rank)

    def positions(self, rank: int | None = None) -> torch.Tensor:
        """``[2L/cp]`` int64 indices into the two-stream row: the noisy positions, then the clean ones."""
        s = self.stream_positions(rank)
        return torch.cat([s, s + self.seq_len])

    def gathered_order(self) -> torch.Tensor:
        """``[2L]``: the row position of each entry of the ranks' slices concatenated in rank order."""
        return torch.cat([self.positions(r) for r in range(self.cp)])

    def to_row_order(self) -> torch.Tensor:
        """``[2L]``: indexes the rank-order concatenation back into row order (inverse of :meth:`gathered_order`)."""
        return inverse_order(self.gathered_order())
