"""Pretraining data: tokenize documents, append EOS, pack greedily into rows of exactly L tokens.

Tokenising (:class:`PretrainEncoder`, run on batches, in worker processes when ``num_proc > 1``):

* ``add_special_tokens=False``: no BOS is added, only the EOS appended after every document
  (tokenizers that want a BOS per document, e.g. Llama's, are not given one; the document-id
  attention masks already restart every document);
* ``split_special_tokens=True``: a literal ``"<|endoftext|>"`` inside a web document is encoded
  as ordinary text, so the EOS/control ids appear only where this code puts them and document
  ids change exactly after each EOS.

Packing (:func:`layout_continuous`): the documents, in the order given (the blend has already
shuffled them), are concatenated and cut every L tokens. A document that runs over the end of a
row is split and continues at the start of the next row; each piece gets its own document id in
its row. The tail that does not fill a last row is dropped and counted (``dropped_tokens``).
There is no padding, so ``loss_mask`` is all 1.
"""

from __future__ import annotations

import numpy as np

from . import report as R
from .packing import Layout

__all__ = ["PretrainEncoder", "layout_continuous"]


class PretrainEncoder:
    """``encoder(texts) -> [uint32 ids + [EOS], or (reason, detail)]`` for a batch of documents."""

    def __init__(self, tok) -> None:
        if tok.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token; pretraining appends EOS after every document")
        self.tok = tok
        self.eos = int(tok.eos_token_id)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tok(
            texts, add_special_tokens=False, split_special_tokens=True, return_attention_mask=False
        )["input_ids"]

    def __call__(self, texts: list[str]) -> list[np.ndarray | tuple[str, str]]:
        try:
            enc = self._encode(texts)
        except Exception:  # one bad document must not sink the batch: redo it one by one
            enc = []
            for text in texts:
                try:
                    enc.append(self._encode([text])[0])
                except Exception as e:
                    enc.append((R.TOKENIZER_ERROR, f"{type(e).__name__}: {e}"))
        out: list[np.ndarray | tuple[str, str]] = []
        for ids in enc:
            if isinstance(ids, tuple):
                out.append(ids)
                continue
            if not ids:  # e.g. text of characters the tokenizer drops entirely
                out.append((R.EMPTY_TEXT, "no tokens"))
                continue
            arr = np.empty(len(ids) + 1, dtype=np.uint32)
            arr[:-1] = ids
            arr[-1] = self.eos
            out.append(arr)
        return out


def layout_continuous(src: np.ndarray, doc: np.ndarray, lengths: np.ndarray, seq_len: int) -> Layout:
    """Place documents back to back, cut every ``seq_len`` tokens, drop the incomplete tail.

    Args:
        src, doc: int ``[n]`` store index and document index of each document, in output order.
        lengths: int ``[n]`` token count (EOS included) of each document.
    Returns:
        the :class:`Layout`; ``rows = sum(lengths) // seq_len``.
    """
    src = np.asarray(src, dtype=np.int64)
    doc = np.asarray(doc, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    total = int(ends[-1]) if len(ends) else 0
    rows = total // seq_len
    cut = rows * seq_len
    if rows == 0:
        layout = Layout.empty()
        layout.dropped_tokens = total
        return layout
    keep = starts < cut  # documents with at least one token in the rows (a prefix of the list)
    starts, ends, src, doc = starts[keep], np.minimum(ends[keep], cut), src[keep], doc[keep]
    first_row = starts // seq_len
    n_pieces = (ends - 1) // seq_len - first_row + 1
    owner = np.repeat(np.arange(len(starts)), n_pieces)  # document of each piece
    k = np.arange(len(owner)) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)  # piece no. within doc
    row = first_row[owner] + k
    g0 = np.maximum(starts[owner], row * seq_len)  # global start/end of each piece
    g1 = np.minimum(ends[owner], (row + 1) * seq_len)
    return Layout(
        rows=rows,
        row=row,
        col=g0 - row * seq_len,
        src=src[owner],
        doc=doc[owner],
        start=g0 - starts[owner],
        length=g1 - g0,
        dropped_tokens=total - cut,
    )
