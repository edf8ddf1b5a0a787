"""Attention patterns of AR→DLM training and decoding, as predicates over (query, key) positions.

A pattern is a vectorised predicate ``allow(batch, q, k, layout) -> bool`` over integer tensors that
broadcast against each other. The same predicate feeds two builders:

* :func:`dense_mask` — a boolean ``[b, 1, S, S]`` mask (True = may attend) for SDPA; used on CPU,
  where flex-attention has no backward, and as a reference everywhere;
* :func:`flex_block_mask` — a flex-attention ``BlockMask`` for CUDA, which skips the empty tiles
  (the two-stream pattern keeps only ~25 % of the 2L × 2L pairs).

Two-stream patterns work on rows ``[x_t ; x_0]`` of length S = 2L (noisy stream first); single-stream
patterns on rows of length S = L. With packed rows (per-token document ids) no pattern lets attention
cross a document boundary, and block indices restart at every document start, so a packed row behaves
exactly like its documents run one by one.

Sliding windows: both builders take an optional ``window`` W and then also require
``pos(q) - pos(k) < W``, with ``pos`` the token's RoPE position (its position inside its document, the
same for both streams). That is transformers' own sliding-window rule (a query sees the W most recent
positions, itself included) applied on the position axis, so the clean stream sees exactly what the
base model's windowed layer sees and the noisy stream is windowed on the same scale.

Spec: docs/method.md, "Attention pattern" (the Nemotron-Labs-Diffusion "sbd_block_diff" mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = [
    "SequenceLayout",
    "Pattern",
    "PATTERNS",
    "get_pattern",
    "dense_mask",
    "flex_block_mask",
    "document_positions",
]


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of every token inside its own document.

    Args:
        doc_ids: ``[b, L]`` integer document id per token; a new document starts wherever the id
            changes from the previous token (ids need not be sorted or unique across a row).
    Returns:
        ``[b, L]`` int64, 0 at each document start, counting up inside the document.
    """
    b, length = doc_ids.shape
    idx = torch.arange(length, device=doc_ids.device).expand(b, length)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    # index of the most recent document start at or before each position
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


@dataclass(frozen=True)
class SequenceLayout:
    """What a pattern needs to know about a batch of rows.

    Attributes:
        seq_len: L, the number of tokens of one stream.
        block_size: B, the diffusion block size.
        doc_ids: optional ``[b, L]`` document id per token (packed rows). ``None`` = one document.
    """

    seq_len: int
    block_size: int
    doc_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.seq_len <= 0 or self.block_size <= 0:
            raise ValueError(f"seq_len and block_size must be positive, got {self.seq_len}, {self.block_size}")
        if self.doc_ids is not None and self.doc_ids.shape[-1] != self.seq_len:
            raise ValueError(f"doc_ids has length {self.doc_ids.shape[-1]}, expected seq_len={self.seq_len}")

    def block_ids(self) -> torch.Tensor | None:
        """``[b, L]`` block index of each token inside its document, or None without doc ids."""
        if self.doc_ids is None:
            return None
        return torch.div(document_positions(self.doc_ids), self.block_size, rounding_mode="floor")


PredicateFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "_Index"], torch.Tensor]


class _Index:
    """Per-token lookups (document, block) shared by every predicate; works in eager and flex."""

    def __init__(self, layout: SequenceLayout, device: torch.device | None = None):
        self.L = layout.seq_len
        self.B = layout.block_size
        self.doc = None if layout.doc_ids is None else layout.doc_ids.to(device)
        blocks = layout.block_ids()
        self.blk = None if blocks is None else blocks.to(device)
        self.pos = None if layout.doc_ids is None else document_positions(layout.doc_ids).to(device)

    def same_doc(self, b, i, j):
        if self.doc is None:
            return (i >= 0) & (j >= 0)  # a tensor of the broadcast shape, all True
        return self.doc[b, i] == self.doc[b, j]

    def position(self, b, i):
        """RoPE position of stream index ``i`` (its index inside its document)."""
        if self.pos is None:
            return i
        return self.pos[b, i]

    def block(self, b, i):
        if self.blk is None:
            return i // self.B
        return self.blk[b, i]


def _two_stream(clean_block_causal: bool) -> PredicateFn:
    def allow(b, q, k, ix: _Index):
        L = ix.L
        q_noisy, k_noisy = q < L, k < L
        qi, ki = q % L, k % L
        bq, bk = ix.block(b, qi), ix.block(b, ki)
        noisy_same_block = q_noisy & k_noisy & (bq == bk)  # M_BD
        noisy_sees_earlier_clean = q_noisy & ~k_noisy & (bk < bq)  # M_OBC
        if clean_block_causal:
            clean_sees_clean = ~q_noisy & ~k_noisy & (bk <= bq)  # M_BC (BD3-LM)
        else:
            clean_sees_clean = ~q_noisy & ~k_noisy & (ki <= qi)  # token-causal (NLD)
        return (noisy_same_block | noisy_sees_earlier_clean | clean_sees_clean) & ix.same_doc(b, qi, ki)

    return allow


def _block_causal(b, q, k, ix: _Index):
    return (ix.block(b, q) >= ix.block(b, k)) & ix.same_doc(b, q, k)


def _bidirectional(b, q, k, ix: _Index):
    return ix.same_doc(b, q, k) & (q >= 0) & (k >= 0)


def _causal(b, q, k, ix: _Index):
    return (k <= q) & ix.same_doc(b, q, k)


@dataclass(frozen=True)
class Pattern:
    """A named attention pattern.

    Attributes:
        name: registry name.
        streams: 2 for patterns over ``[x_t ; x_0]`` rows (S = 2L), 1 for single-stream rows (S = L).
        allow: the predicate.
        doc: one-line description.
    """

    name: str
    streams: int
    allow: PredicateFn
    doc: str

    def row_length(self, layout: SequenceLayout) -> int:
        return self.streams * layout.seq_len


PATTERNS: dict[str, Pattern] = {
    p.name: p
    for p in (
        Pattern("two_stream", 2, _two_stream(clean_block_causal=False),
                "NLD: noisy block bidirectional, noisy sees strictly earlier clean blocks, clean token-causal"),
        Pattern("bd3", 2, _two_stream(clean_block_causal=True),
                "BD3-LM / Efficient-DLM: as two_stream but the clean stream is block-causal"),
        Pattern("block_causal", 1, _block_causal,
                "noisy stream only, block-causal, no clean context (Efficient-DLM efficient_block_diff)"),
        Pattern("bidirectional", 1, _bidirectional, "full bidirectional attention (Dream / LLaDA)"),
        Pattern("causal", 1, _causal, "plain autoregressive attention"),
    )
}


def _windowed(pattern: Pattern, window: int | None) -> PredicateFn:
    """``pattern.allow`` restricted to keys fewer than ``window`` positions behind the query (None = no window)."""
    if window is None:
        return pattern.allow
    if int(window) <= 0:
        raise ValueError(f"a sliding window must be a positive number of positions, got {window}")
    two_streams = pattern.streams > 1

    def allow(b, q, k, ix: _Index):
        qi, ki = (q % ix.L, k % ix.L) if two_streams else (q, k)
        near = (ix.position(b, qi) - ix.position(b, ki)) < window
        return pattern.allow(b, q, k, ix) & near

    return allow


def get_pattern(name: str) -> Pattern:
    """Look a pattern up by name; unknown names raise with the list of known ones."""
    try:
        return PATTERNS[name]
    except KeyError:
        raise KeyError(f"unknown attention pattern {name!r}; known: {sorted(PATTERNS)}") from None


_MASK_SLICE_ELEMENTS = 1 << 24
"""Query rows × keys (× batch) per slice of :func:`dense_mask`: bounds its int64 intermediates near 128 MiB."""


def dense_mask(pattern: Pattern | str, layout: SequenceLayout, batch_size: int = 1,
               device: torch.device | str | None = None, window: int | None = None,
               query_index: torch.Tensor | None = None) -> torch.Tensor:
    """Dense boolean mask for SDPA (and the source of the eager additive form).

    Args:
        window: optional sliding window W (see the module docstring); None = unlimited.
        query_index: optional ``[q]`` int64 row positions: only these query rows are built (the rows
            a context-parallel rank holds, :mod:`.context_split`); None = every row.

    Returns:
        ``[b, 1, q, S]`` bool, True where query row may attend key column; b = number of rows of
        ``layout.doc_ids`` (or ``batch_size`` without doc ids), S = ``pattern.streams * L``, q = S
        or ``len(query_index)``.
    """
    pattern = get_pattern(pattern) if isinstance(pattern, str) else pattern
    ix = _Index(layout, device)
    b = batch_size if layout.doc_ids is None else layout.doc_ids.shape[0]
    s = pattern.row_length(layout)
    bi = torch.arange(b, device=device).view(b, 1, 1)
    rows = torch.arange(s, device=device) if query_index is None else query_index.to(device)
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= s):
        raise ValueError(f"query_index must lie in [0, {s}), got [{int(rows.min())}, {int(rows.max())}]")
    k = torch.arange(s, device=device).view(1, 1, s)
    allow = _windowed(pattern, window)
    out = torch.empty(b, rows.numel(), s, dtype=torch.bool, device=device)
    # query rows in slices: the predicate's int64 intermediates are [b, rows, S], which at long rows
    # (S = 64k positions) would be many GiB at once; a slice keeps them near _MASK_SLICE_ELEMENTS
    step = max(1, _MASK_SLICE_ELEMENTS // (b * s))
    for start in range(0, rows.numel(), step):
        q = rows[start:start + step].view(1, -1, 1)
        out[:, start:start + q.shape[1]] = allow(bi, q, k, ix)
    return out.unsqueeze(1)


def flex_block_mask(pattern: Pattern | str, layout: SequenceLayout, batch_size: int = 1,
                    device: torch.device | str = "cuda", tile: int = 128, window: int | None = None,
                    query_index: torch.Tensor | None = None):
    """flex-attention ``BlockMask`` for the same pattern (CUDA training path; ``window`` as in :func:`dense_mask`).

    The tile size is passed explicitly: relying on a default once produced wrong masks in a peer
    (bd3lms#23). Without doc ids the mask is shared across the batch (B=None broadcast).
    ``query_index`` (``[q]`` global row positions, as :func:`dense_mask`): a ``Q_LEN = q`` mask of
    only those query rows against every key (a context-parallel rank's rows).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    pattern = get_pattern(pattern) if isinstance(pattern, str) else pattern
    ix = _Index(layout, torch.device(device))
    s = pattern.row_length(layout)
    b = None if layout.doc_ids is None else layout.doc_ids.shape[0]
    allow = _windowed(pattern, window)
    if query_index is None:
        def mask_mod(bi, h, q, k):
            return allow(bi, q, k, ix)
        q_len = s
    else:
        rows = query_index.to(device)

        def mask_mod(bi, h, q, k):
            return allow(bi, rows[q], k, ix)
        q_len = rows.numel()
    return create_block_mask(mask_mod, B=b, H=None, Q_LEN=q_len, KV_LEN=s, device=device, BLOCK_SIZE=tile)
