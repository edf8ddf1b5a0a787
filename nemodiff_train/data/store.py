"""Append-only on-disk store of one source's tokenized documents (the intermediate stage).

Preparation tokenizes every source once into a :class:`DocStore` (flat ``uint32`` token file and,
for SFT, a flat ``uint8`` loss-mask file inside the build directory) and only then decides the
train/val split, the blend and the packing, which need the token counts of all documents. Only
small per-document arrays live in memory (length and holdout key: 16 bytes per document), so the
stage scales to corpora far larger than RAM.
"""

from __future__ import annotations

from array import array
from pathlib import Path

import numpy as np

__all__ = ["DocStore"]


class DocStore:
    """Documents of one source: ``tokens(i)`` uint32 ``[len_i]``, ``mask(i)`` uint8 ``[len_i]``.

    Lifecycle: ``append`` while tokenizing, then ``finish`` once; reads are valid after
    ``finish``. ``mask(i)`` is ``None`` for stores created with ``with_mask=False`` (pretraining:
    every token is supervised).
    """

    def __init__(self, prefix: str | Path, *, with_mask: bool) -> None:
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.with_mask = with_mask
        self._tok_path = self.prefix.with_name(self.prefix.name + ".tokens.bin")
        self._mask_path = self.prefix.with_name(self.prefix.name + ".mask.bin")
        self._tok_f = open(self._tok_path, "wb")
        self._mask_f = open(self._mask_path, "wb") if with_mask else None
        # growable C arrays (8 bytes per entry), not lists of Python ints (~36 bytes each)
        self._lengths = array("q")
        self._keys = array("Q")
        self._n_tokens = 0
        self._supervised = 0
        self.lengths: np.ndarray | None = None  # int64 [n_docs], after finish()
        self.keys: np.ndarray | None = None  # uint64 [n_docs] holdout hash keys, after finish()
        self.offsets: np.ndarray | None = None  # int64 [n_docs + 1], after finish()
        self._tokens: np.ndarray | None = None
        self._mask: np.ndarray | None = None

    def append(self, ids: np.ndarray, mask: np.ndarray | None, key: int) -> None:
        """Add one document: ``ids`` uint32 ``[n]``, ``mask`` uint8 ``[n]`` (or None), hash ``key``."""
        ids = np.ascontiguousarray(ids, dtype=np.uint32)
        self._tok_f.write(ids.tobytes())
        if self._mask_f is not None:
            mask = np.ascontiguousarray(mask, dtype=np.uint8)
            assert mask.shape == ids.shape, (mask.shape, ids.shape)
            self._mask_f.write(mask.tobytes())
            self._supervised += int(mask.sum())
        else:
            self._supervised += len(ids)
        self._lengths.append(len(ids))
        self._keys.append(key)
        self._n_tokens += len(ids)

    @property
    def n_docs(self) -> int:
        return len(self._lengths) if self.lengths is None else len(self.lengths)

    @property
    def n_tokens(self) -> int:
        return self._n_tokens

    @property
    def n_supervised(self) -> int:
        return self._supervised

    def finish(self) -> "DocStore":
        """Close the files and map them for reading."""
        self._tok_f.close()
        if self._mask_f is not None:
            self._mask_f.close()
        self.lengths = np.frombuffer(self._lengths, dtype=np.int64).copy()
        self.keys = np.frombuffer(self._keys, dtype=np.uint64).copy()
        self.offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])
        self._lengths, self._keys = array("q"), array("Q")
        # np.memmap cannot map an empty file
        n = int(self.offsets[-1])
        self._tokens = np.memmap(self._tok_path, dtype=np.uint32, mode="r") if n else np.zeros(0, np.uint32)
        if self.with_mask:
            self._mask = np.memmap(self._mask_path, dtype=np.uint8, mode="r") if n else np.zeros(0, np.uint8)
        return self

    def tokens(self, i: int) -> np.ndarray:
        return self._tokens[self.offsets[i] : self.offsets[i + 1]]

    def mask(self, i: int) -> np.ndarray | None:
        return None if self._mask is None else self._mask[self.offsets[i] : self.offsets[i + 1]]

    def supervised(self, i: int, start: int = 0, stop: int | None = None) -> int:
        """Number of supervised tokens of document ``i`` in ``[start, stop)``."""
        n = int(self.lengths[i])
        stop = n if stop is None else stop
        if self._mask is None:
            return stop - start
        return int(self.mask(i)[start:stop].sum())

    def close(self) -> None:
        """Drop the maps (the files are deleted with the build directory)."""
        for f in (self._tok_f, self._mask_f):
            if f is not None and not f.closed:
                f.close()
        self._tokens = self._mask = None
