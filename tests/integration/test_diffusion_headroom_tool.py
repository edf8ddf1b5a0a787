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
            # right-and-confident can be no more than right, nor than confident
            if row["confident"] == 0:
                assert row["confident_accuracy"] is None
            else:
                assert row["confident_accuracy"] * row["confident"] <= row["accuracy"] + 1e-9
        # the AR base has never seen a mask: its diffusion view is far less accurate than its AR view
        assert out["diffusion"][1]["accuracy"] < out["ar"]["accuracy"]


@pytest.mark.parametrize("tau", [0.0, 0.5])
def test_headroom_precision_matches_a_direct_count(tau):
    """``confident_accuracy`` recounted by hand from plain block-view forwards of the same blocks. The
    untrained base is confident (>= 0.5) only where it is wrong, and right only below 0.5, so the two
    thresholds tell a precision from an accuracy and from a constant."""
    import torch

    from nemodiff_train.eval.headroom import block_view_probs, measure

    dlm, _, eos, _ = load_for_decoding(embedded_model_dir(), device="cpu")
    task = get_task("arithmetic", tokenizer=dlm.tokenizer, limit=3)
    block, stride = 4, 3
    out = measure(dlm, task, eos, block, tau, max_ref_tokens=30, stride=stride)
    sure = {k: 0 for k in range(1, block)}
    sure_right = dict(sure)
    mask_id = dlm.settings.mask_token_id
    with torch.inference_mode():
        for sample in task.samples():
            prompt = task.render(dlm.tokenizer, sample)
            ref = dlm.tokenizer.encode(sample.reference, add_special_tokens=False)[:30] + [eos[0]]
            for t in range(0, len(ref) - block, stride):
                probs = block_view_probs(dlm.hf, prompt + ref[:t], [ref[t]] + [mask_id] * (block - 1))
                probs[:, mask_id] = 0.0
                for k in range(1, block):
                    c, a = probs[k].max(0)
                    if float(c) >= tau:
                        sure[k] += 1
                        sure_right[k] += int(a) == ref[t + k]
    assert sum(sure_right.values()) > 0 if tau == 0.0 else sum(sure.values()) > 0  # the case is not empty
    for row in out["diffusion"]:
        k = row["offset"]
        assert round(row["confident"] * row["blocks"]) == sure[k]
        expected = sure_right[k] / sure[k] if sure[k] else None
        assert row["confident_accuracy"] == expected
