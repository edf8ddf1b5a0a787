"""``nemodiff-eval batch_size=3`` decodes every mode batched (self-speculation included), and every sample's
output and ``forwards`` in samples.jsonl equal those of ``batch_size=1``; eval.json says the batch size."""

from __future__ import annotations

import json

import pytest

from nemodiff_train.assets import embedded_model_dir
from nemodiff_train.cli.evaluate import to_eval_config
from nemodiff_train.eval.runner import run_evaluation

pytestmark = pytest.mark.integration


def samples(out):
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return {(r["mode"], r["index"]): (r["output_ids"], r["forwards"], r["finished_by"]) for r in rows}


def test_batch_size_applies_to_every_mode(tmp_path):
    outs = {}
    for batch in (1, 3):
        out = tmp_path / f"b{batch}"
        cfg = to_eval_config({"model": str(embedded_model_dir()), "out": str(out), "task": "arithmetic",
                              "limit": 5, "max_new_tokens": 12, "block_size": 4, "batch_size": batch,
                              "sweep": {"threshold": []}})
        rows = run_evaluation(cfg)
        assert {r["mode"] for r in rows} == {"ar", "diffusion", "linear_spec", "quadratic_spec"}
        assert all(r["batch_size"] == batch for r in rows)
        outs[batch] = samples(out)
    assert outs[3] == outs[1]  # 5 prompts = a batch of 3 and a batch of 2, ragged lengths
    assert {k[0] for k in outs[3]} == {"ar", "diffusion", "linear_spec", "quadratic_spec"}
