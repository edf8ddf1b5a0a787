"""Data and scoring of the packaged lm-eval task ``nemodiff_code_completion`` (the YAML beside this).

lm-eval imports this file by path for the YAML's ``!function`` entries, so it reads the held-out
rows shipped in the package by their location, whatever the working directory, and scores with
the same functions as ``nemodiff-eval``'s ``code_completion`` task (``nemodiff_train.tasks.scoring``).
"""

from __future__ import annotations

import json
from pathlib import Path

# nemodiff_train/eval/lm_eval_tasks/utils.py -> nemodiff_train/assets/data/
DATA = Path(__file__).resolve().parents[2] / "assets" / "data" / "code_completion_test.jsonl"


def load_code_completion(**metadata):
    """``{"test": Dataset}`` of ``prompt`` / ``reference`` / ``source`` / ``name`` rows."""
    import datasets

    if not DATA.is_file():
        raise FileNotFoundError(f"{DATA} is missing (built by scripts/build_embedded_model.py)")
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """``first_line_exact`` and ``ast_valid`` of one generated body (lm-eval passes ``[text]``)."""
    from nemodiff_train.tasks import scoring

    (text,) = results
    first = scoring.first_nonempty_line
    return {"first_line_exact": float(first(text) == first(doc["reference"])),
            "ast_valid": scoring.ast_valid(doc["prompt"], text)}
