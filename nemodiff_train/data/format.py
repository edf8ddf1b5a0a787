"""On-disk layout of a *prepared dataset* and the atomic way it is written.

A prepared dataset is a directory::

    <out>/meta.json                 written last; its presence marks the directory complete
    <out>/{split}.tokens.npy        uint32 [rows, L]  token ids
    <out>/{split}.docs.npy          int32  [rows, L]  document id per token (0, 1, 2, ... within a
                                                      row; a new document starts where it changes)
    <out>/{split}.loss_mask.npy     uint8  [rows, L]  1 = token is supervised

for ``split`` in :data:`SPLITS` (``train``, ``val``; a split may have 0 rows). The arrays are
``.npy`` files written through :func:`numpy.lib.format.open_memmap` and read back with
``np.load(..., mmap_mode="r")``, so opening a dataset (e.g. on a training restart) reads only the
headers and pages rows in on demand.

Atomicity: everything is built in a sibling directory ``<out>.tmp-<pid>`` and moved into place
with one :func:`os.replace`. A crash leaves at most that temporary directory behind (it is removed
on ordinary exceptions; after a hard kill it stays and can be deleted by hand; it is never picked
up because it is not named ``<out>``). A directory without ``meta.json`` is incomplete.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from numpy.lib.format import open_memmap

__all__ = [
    "FORMAT_VERSION",
    "SPLITS",
    "META_FILE",
    "ARRAY_DTYPES",
    "DataFormatError",
    "array_path",
    "read_meta",
    "write_meta",
    "open_split_arrays",
    "create_split_arrays",
    "temp_dir_for",
    "atomic_dir",
]

FORMAT_VERSION = 1
SPLITS = ("train", "val")
META_FILE = "meta.json"
# array name -> dtype; names are part of the file names ({split}.{name}.npy)
ARRAY_DTYPES: dict[str, np.dtype] = {
    "tokens": np.dtype(np.uint32),
    "docs": np.dtype(np.int32),
    "loss_mask": np.dtype(np.uint8),
}


class DataFormatError(ValueError):
    """A prepared dataset exists but cannot be used (unknown version, inconsistent arrays...)."""


def array_path(root: str | Path, split: str, name: str) -> Path:
    """Path of array ``name`` (``tokens``/``docs``/``loss_mask``) of ``split`` under ``root``."""
    return Path(root) / f"{split}.{name}.npy"


def read_meta(root: str | Path) -> dict:
    """Read and check ``<root>/meta.json``.

    Raises:
        FileNotFoundError: the directory does not exist, or has no ``meta.json`` (incomplete:
            preparation never finished there).
        DataFormatError: ``meta.json`` is not valid JSON or has an unknown ``format_version``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"prepared dataset {str(root)!r} does not exist (run `nemodiff-data` first)")
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"prepared dataset {str(root)!r} is incomplete: it has no {META_FILE} "
            "(preparation did not finish there; delete it and prepare again)"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataFormatError(f"prepared dataset {str(root)!r}: cannot read {META_FILE}: {e}") from e
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise DataFormatError(
            f"prepared dataset {str(root)!r} has format_version {version!r}; this version of "
            f"nemodiff_train reads format_version {FORMAT_VERSION} (prepare the data again)"
        )
    return meta


def write_meta(root: str | Path, meta: dict) -> None:
    """Write ``meta.json`` and fsync it (it is the completion marker, so it must not be torn)."""
    path = Path(root) / META_FILE
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def create_split_arrays(root: str | Path, split: str, rows: int, seq_len: int) -> dict[str, np.memmap]:
    """Create the three ``[rows, seq_len]`` arrays of ``split`` as writable memmaps (zero-filled)."""
    return {
        name: open_memmap(array_path(root, split, name), mode="w+", dtype=dtype, shape=(rows, seq_len))
        for name, dtype in ARRAY_DTYPES.items()
    }


def open_split_arrays(
    root: str | Path, split: str, rows: int | None = None, seq_len: int | None = None
) -> dict[str, np.ndarray]:
    """Open the three arrays of ``split`` read-only (memory-mapped) and check dtypes and shapes.

    Args:
        rows, seq_len: expected shape (from ``meta.json``); ``None`` skips that check.
    Returns:
        ``{"tokens": uint32 [rows, L], "docs": int32 [rows, L], "loss_mask": uint8 [rows, L]}``.
    """
    out = {}
    for name, dtype in ARRAY_DTYPES.items():
        path = array_path(root, split, name)
        if not path.is_file():
            raise FileNotFoundError(f"prepared dataset {str(root)!r} is incomplete: {path.name} is missing")
        arr = np.load(path, mmap_mode="r")
        expected = (rows if rows is not None else arr.shape[0], seq_len if seq_len is not None else arr.shape[-1])
        if arr.dtype != dtype or arr.ndim != 2 or tuple(arr.shape) != expected:
            raise DataFormatError(
                f"prepared dataset {str(root)!r}: {path.name} is {arr.dtype}{list(arr.shape)}, "
                f"expected {dtype}{list(expected)}"
            )
        out[name] = arr
    return out


def temp_dir_for(out: str | Path) -> Path:
    """The private build directory of this process for final directory ``out``."""
    out = Path(out)
    return out.parent / f"{out.name}.tmp-{os.getpid()}"


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory; on normal exit move it to ``out`` in one step.

    On an exception the temporary directory is deleted and ``out`` is left untouched. The final
    ``os.replace`` fails if ``out`` exists and is not empty (e.g. another process finished the
    same preparation first); callers handle that :class:`OSError`, and the temporary directory is
    deleted in that case too.
    """
    out = Path(out)
    tmp = temp_dir_for(out)
    if tmp.exists():  # left by an earlier process that had our pid and was killed
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
