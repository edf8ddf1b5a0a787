"""tools/diffusion_headroom.py on the embedded base model: the numbers it prints are well formed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from nemodiff_train.assets import embedded_model_dir
from nemodiff_train.eval.loading import load_for_eval
from nemodiff_train.eval.tasks import get_task

pytestmark = pytest.mark.integration
TOOL = Path(__file__).resolve().parents[2] / "tools" / "diffusion_headroom.py"


def _tool():
    spec = importlib.util.spec_from_file_location("diffusion_headroom", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_headroom_on_embedded_model(tmp_path):
    tool = _tool()
    out_json = tmp_path / "h.json"
    out = tool.main([str(embedded_model_dir()), "--limit", "2", "--block-size", "4", "--stride", "5",
                     "--threads", "1", "--json", str(out_json)])
    assert json.loads(out_json.read_text()) == out
    dlm, _, eos, _ = load_for_eval(embedded_model_dir(), device="cpu")
    task = get_task("code_completion", tokenizer=dlm.tokenizer, limit=2)
    refs = [dlm.tokenizer.encode(s.reference, add_special_tokens=False)[:40] + [eos[0]] for s in task.samples()]
    assert out["ar"]["tokens"] == sum(map(len, refs))
    blocks = sum(len(range(0, len(r) - 4, 5)) for r in refs)
    assert [row["offset"] for row in out["diffusion"]] == [1, 2, 3]
    for row in out["diffusion"]:
        assert row["blocks"] == blocks
        assert 0.0 <= row["confident"] <= 1.0 and 0.0 < row["mean_confidence"] <= 1.0 and 0.0 <= row["accuracy"] <= 1.0
    # the AR base has never seen a mask: its diffusion view is far less accurate than its AR view
    assert out["diffusion"][1]["accuracy"] < out["ar"]["accuracy"]
