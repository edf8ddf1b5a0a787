"""Writing packed rows: a :class:`Layout` (where every document piece goes) and its writer.

The packers (:func:`nemodiff_train.data.pretrain.layout_continuous`,
:func:`nemodiff_train.data.sft.layout_packed`, :func:`nemodiff_train.data.sft.layout_padded`)
only decide *placement* from document lengths; :func:`write_split` then copies the tokens from
the :class:`~nemodiff_train.data.store.DocStore` files into the split's memory-mapped arrays.

Document ids inside a row are ``0, 1, 2, ...`` in placement order, one per piece, so a piece that
continues a document from the previous row starts a new id (attention and diffusion blocks
restart there: the model never attends across rows anyway). Padding at the end of a row
(SFT only) gets the next id, its own "document", with ``loss_mask`` 0 and the pad token id, so
real tokens never attend to padding and vice versa.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .format import create_split_arrays
from .store import DocStore

__all__ = ["Layout", "write_split"]


@dataclass
class Layout:
    """Placement of document pieces in ``rows`` rows of length L.

    All arrays are int64 ``[n_pieces]``, sorted by ``(row, col)``; within a row the pieces are
    contiguous from column 0 (any remainder is padding). Piece ``k`` copies tokens
    ``[start[k], start[k] + length[k])`` of document ``doc[k]`` of store ``src[k]`` to
    ``row[k], col[k]:col[k] + length[k]``.
    """

    rows: int
    row: np.ndarray
    col: np.ndarray
    src: np.ndarray
    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray
    dropped_tokens: int = 0  # tokens of the incomplete last row that were not written

    @classmethod
    def empty(cls) -> "Layout":
        z = np.zeros(0, dtype=np.int64)
        return cls(0, z, z, z, z, z, z)


def write_split(
    root: str | Path, split: str, layout: Layout, stores: list[DocStore], seq_len: int, pad_id: int
) -> dict:
    """Write the ``{split}.*.npy`` arrays of ``layout`` under ``root``.

    Returns:
        split statistics for ``meta.json``: ``rows``, ``tokens`` (non-padding positions),
        ``supervised_tokens`` (loss_mask sum), ``documents`` (documents whose first token is in
        the rows, repeats counted), ``pad_tokens`` and ``dropped_tokens``.
    """
    arrays = create_split_arrays(root, split, layout.rows, seq_len)
    tokens, docs, loss_mask = arrays["tokens"], arrays["docs"], arrays["loss_mask"]
    n = len(layout.row)
    # id of each piece within its row: position minus the position of the row's first piece
    is_first = np.ones(n, dtype=bool)
    is_first[1:] = layout.row[1:] != layout.row[:-1]
    group_start = np.maximum.accumulate(np.where(is_first, np.arange(n), 0)) if n else np.zeros(0, np.int64)
    piece_id = np.arange(n) - group_start

    supervised = 0
    for k in range(n):
        store = stores[layout.src[k]]
        d, a, m = int(layout.doc[k]), int(layout.start[k]), int(layout.length[k])
        r, c = int(layout.row[k]), int(layout.col[k])
        tokens[r, c : c + m] = store.tokens(d)[a : a + m]
        docs[r, c : c + m] = piece_id[k]
        mask = store.mask(d)
        if mask is None:
            loss_mask[r, c : c + m] = 1
            supervised += m
        else:
            piece_mask = mask[a : a + m]
            loss_mask[r, c : c + m] = piece_mask
            supervised += int(piece_mask.sum())

    used = np.bincount(layout.row, weights=layout.length, minlength=layout.rows).astype(np.int64)
    pieces_per_row = np.bincount(layout.row, minlength=layout.rows)
    if np.any(used > seq_len):
        raise AssertionError("layout overfills a row")  # a packer bug, never data
    for r in np.nonzero(used < seq_len)[0]:
        tokens[r, used[r] :] = pad_id
        docs[r, used[r] :] = pieces_per_row[r]  # padding is its own document (loss_mask stays 0)
    for arr in arrays.values():
        arr.flush()
    del arrays, tokens, docs, loss_mask

    n_tokens = int(layout.length.sum())
    return {
        "rows": int(layout.rows),
        "tokens": n_tokens,
        "supervised_tokens": int(supervised),
        "documents": int(np.count_nonzero(layout.start == 0)),
        "pad_tokens": int(layout.rows * seq_len - n_tokens),
        "dropped_tokens": int(layout.dropped_tokens),
    }
