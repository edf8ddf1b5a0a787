"""``PackedDataset``: one split of a prepared dataset as a map-style torch ``Dataset``.

Opening reads ``meta.json`` and the ``.npy`` headers only; the arrays are memory-mapped, so
``dataset[i]`` pages in one row. The memmaps are not pickled: a copy sent to a ``DataLoader``
worker (spawn) re-opens the files instead of shipping the arrays (pickling an ``np.memmap``
would copy the whole array into the pickle).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .format import SPLITS, DataFormatError, open_split_arrays, read_meta

__all__ = ["PackedDataset"]


class PackedDataset(Dataset):
    """Rows of split ``split`` of the prepared dataset in ``root``.

    ``dataset[i]`` is a dict:

    * ``input_ids``: int64 ``[L]`` token ids;
    * ``doc_ids``: int64 ``[L]`` document id per token (a document starts where it changes;
      padding is its own document);
    * ``loss_mask``: bool ``[L]``, True where the token is supervised;
    * ``index``: ``int``, equal to ``i``.

    Raises (on construction): ``FileNotFoundError`` naming the directory if it or its
    ``meta.json`` / arrays are missing (incomplete preparation); ``DataFormatError`` if the
    ``format_version`` is unknown or the arrays do not match ``meta.json``; ``KeyError`` for a
    split that is not in the dataset.
    """

    def __init__(self, root: str | Path, split: str = "train") -> None:
        self.root = Path(root)
        self.split = split
        self._meta = read_meta(self.root)
        splits = self._meta.get("splits", {})
        if split not in splits:
            raise KeyError(
                f"prepared dataset {str(self.root)!r} has no split {split!r} "
                f"(it has {sorted(splits)}; expected {list(SPLITS)})"
            )
        try:
            self._rows = int(splits[split]["rows"])
            self._seq_len = int(self._meta["seq_len"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataFormatError(f"prepared dataset {str(self.root)!r}: malformed meta.json ({e!r})") from e
        self._arrays: dict[str, np.ndarray] | None = None
        self._open()  # validate the files now, so a broken dataset fails at construction

    def _open(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = open_split_arrays(self.root, self.split, self._rows, self._seq_len)
        return self._arrays

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"] = None  # re-opened lazily in the receiving process
        return state

    @property
    def meta(self) -> dict:
        """The parsed ``meta.json``."""
        return self._meta

    @property
    def seq_len(self) -> int:
        return self._seq_len

    def __len__(self) -> int:
        return self._rows

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < self._rows:
            raise IndexError(f"row {i} out of range for {self._rows} rows of {str(self.root)!r} [{self.split}]")
        a = self._open()
        return {
            "input_ids": torch.from_numpy(a["tokens"][i].astype(np.int64)),
            "doc_ids": torch.from_numpy(a["docs"][i].astype(np.int64)),
            "loss_mask": torch.from_numpy(a["loss_mask"][i].astype(bool)),
            "index": i,
        }
