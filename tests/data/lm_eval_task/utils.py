"""Loaders for the tiny local lm-eval tasks used by the nemodiff plugin tests.

``custom_dataset`` functions get the task metadata as keyword arguments; the data sit next to
this file, so the tasks work from any working directory (lm-eval resolves ``data_files``
against the current directory, not the YAML's).
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(name: str):
    import datasets

    rows = [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_gen(**metadata):
    return _load("gen.jsonl")


def load_mc(**metadata):
    return _load("mc.jsonl")


def load_text(**metadata):
    return _load("text.jsonl")
