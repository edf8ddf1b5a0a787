"""``nemodiff-eval analysis=headroom`` on the embedded base model: the numbers are well formed."""

from __future__ import annotations

import json

import pytest

from nemodiff_train.assets import embedded_model_dir
from nemodiff_train.cli.evaluate import to_eval_config
from nemodiff_train.models.loading import load_for_decoding
from nemodiff_train.eval.runner import run_evaluation
from nemodiff_train.tasks import get_task

pytestmark = pytest.mark.integration


def test_headroom_on_embedded_model(tmp_path):
    cfg = to_eval_config({"model": str(embedded_model_dir()), "out": str(tmp_path), "analysis": "headroom",
                          "task": ["code_completion", "arithmetic"], "limit": 2, "block_size": 4,
                          "headroom": {"stride": 5}})
    results = run_evaluation(cfg)
    assert json.loads((tmp_path / "headroom.json").read_text()) == results
    assert [r["task"] for r in results] == ["code_completion", "arithmetic"]
    dlm, _, eos, _ = load_for_decoding(embedded_model_dir(), device="cpu")
    for out in results:
        task = get_task(out["task"], tokenizer=dlm.tokenizer, limit=2)
        refs = [dlm.tokenizer.encode(s.reference, add_special_tokens=False)[:40] + [eos[0]] for s in task.samples()]
        assert out["ar"]["tokens"] == sum(map(len, refs))
        blocks = sum(len(range(0, len(r) - 4, 5)) for r in refs)
        assert [row["offset"] for row in out["diffusion"]] == [1, 2, 3]
        for row in out["diffusion"]:
            assert row["blocks"] == blocks
            assert 0.0 <= row["confident"] <= 1.0 and 0.0 < row["mean_confidence"] <= 1.0
            assert 0.0 <= row["accuracy"] <= 1.0
        # the AR base has never seen a mask: its diffusion view is far less accurate than its AR view
        assert out["diffusion"][1]["accuracy"] < out["ar"]["accuracy"]
