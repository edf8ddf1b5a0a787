"""Embedded default assets: a tiny Qwen3 AR base model, its tokenizer and small datasets.

Everything here is derived offline from the Python standard library's source code and from
generated arithmetic word problems (``scripts/arithmetic_task.py``) by
``scripts/build_embedded_model.py`` (the exact command is recorded in the metadata), so the
toolkit can run end to end without network access or downloaded weights.

Layout::

    tiny_qwen3/                     HF model dir (config, bf16 safetensors, fast tokenizer,
                                    chat template) + nemodiff_embedded.json (metadata)
    data/pretrain_train.jsonl.gz    {"text", "source"}: stdlib modules (train split)
    data/pretrain_val.jsonl.gz      the same, val split
    data/sft_train.jsonl.gz         {"messages": [user, assistant], "source"}: docstring -> body
    data/sft_val.jsonl.gz           the same, from val-split modules
    data/code_completion_test.jsonl {"prompt", "reference", "source", "name"}: test-split modules
    data/arithmetic_pretrain_{train,val}.jsonl.gz  {"text", "source"}: word problem + worked solution
    data/arithmetic_sft_{train,val}.jsonl.gz       {"messages": [user, assistant], "source"}
    data/arithmetic_test.jsonl      {"prompt", "reference", "answer", "template", "held_out_template"}
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = [
    "ASSETS_DIR",
    "DATA_FILES",
    "embedded_data_file",
    "embedded_metadata",
    "embedded_model_dir",
]

# Package data is installed as plain files (setuptools package-data, not zipped), so a
# filesystem path is what HF loaders and `datasets` need.
ASSETS_DIR = Path(__file__).resolve().parent
MODEL_DIRNAME = "tiny_qwen3"
METADATA_FILENAME = "nemodiff_embedded.json"

DATA_FILES = (
    "pretrain_train.jsonl.gz",
    "pretrain_val.jsonl.gz",
    "sft_train.jsonl.gz",
    "sft_val.jsonl.gz",
    "code_completion_test.jsonl",
    "arithmetic_pretrain_train.jsonl.gz",
    "arithmetic_pretrain_val.jsonl.gz",
    "arithmetic_sft_train.jsonl.gz",
    "arithmetic_sft_val.jsonl.gz",
    "arithmetic_test.jsonl",
)


def embedded_model_dir() -> Path:
    """Directory of the embedded base model + tokenizer (loadable with ``from_pretrained``)."""
    path = ASSETS_DIR / MODEL_DIRNAME
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"embedded model missing at {path}; rebuild with scripts/build_embedded_model.py"
        )
    return path


def embedded_data_file(name: str) -> Path:
    """Path of one bundled data file, e.g. ``embedded_data_file("sft_train.jsonl.gz")``.

    The extension may be omitted (``"sft_train"``) for convenience.
    """
    candidates = [name] if name in DATA_FILES else [
        f for f in DATA_FILES if f.split(".", 1)[0] == name
    ]
    if not candidates:
        raise KeyError(f"unknown embedded data file {name!r}; available: {', '.join(DATA_FILES)}")
    path = ASSETS_DIR / "data" / candidates[0]
    if not path.is_file():
        raise FileNotFoundError(f"embedded data file missing at {path}")
    return path


@lru_cache(maxsize=1)
def _read_metadata() -> str:
    """The metadata file's text (cached: it never changes at run time)."""
    return (embedded_model_dir() / METADATA_FILENAME).read_text(encoding="utf-8")


def embedded_metadata() -> dict[str, Any]:
    """Build metadata: python version, split sizes, mask/eos ids, base_val_ar_loss, command, ...

    A fresh dict each call, so callers may mutate it.
    """
    return json.loads(_read_metadata())
