"""Data layer: raw sources -> prepared (tokenized, packed, memory-mapped) datasets -> torch.

Modules, one job each:

* ``sources``  — :class:`SourceSpec`; reading local jsonl/json/parquet/arrow files and Hub data
  sets row by row, reporting malformed rows as ``file:line``;
* ``readers``  — the items readers yield (:class:`Row`, :class:`Skip`), :class:`SourceError`, and
  the JSON-lines / JSON-array file readers;
* ``report``   — skip reasons, counts and examples;
* ``tokenizer``— loading the HF tokenizer, its ids and fingerprint;
* ``ingest``   — one source -> checked, tokenized documents in an on-disk ``store`` (parallel);
* ``blend``    — hash holdout for val, token-weighted blending of sources;
* ``pretrain`` — EOS-terminated documents packed into rows of exactly L;
* ``sft``      — chat template rendering with assistant-only loss mask; packed or padded rows;
* ``packing``  — writing a placement (``Layout``) into the memory-mapped arrays;
* ``format``   — the on-disk format (``meta.json`` + ``.npy``) and atomic directory writes;
* ``prepare``  — :class:`DataPrepConfig` and :func:`prepare` (idempotent, fingerprinted);
* ``packed``   — :class:`PackedDataset`, the torch view of a prepared split;
* ``cli``      — ``nemodiff-data`` (argparse).

Note: ``nemodiff_train.data.prepare`` (the package attribute) is the *function* re-exported
here, which shadows the submodule of the same name for attribute access; to reach the module
(e.g. to monkeypatch it) use ``importlib.import_module("nemodiff_train.data.prepare")`` or
``sys.modules``. ``from nemodiff_train.data.prepare import prepare`` works as usual.
"""

from .format import FORMAT_VERSION, SPLITS, DataFormatError, read_meta
from .packed import PackedDataset
from .prepare import DataPrepConfig, DataPrepError, fingerprint, prepare
from .readers import SourceError
from .sources import SourceSpec

__all__ = [
    "FORMAT_VERSION",
    "SPLITS",
    "DataFormatError",
    "DataPrepConfig",
    "DataPrepError",
    "PackedDataset",
    "SourceError",
    "SourceSpec",
    "fingerprint",
    "prepare",
    "read_meta",
]
