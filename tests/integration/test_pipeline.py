"""The embedded model end to end through the real CLIs: train → export (hf/) → evaluate, then reload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _run(*cmd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, f"{cmd}:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


def test_tiny_recipe_trains_exports_and_evaluates(tmp_path):
    run_dir = tmp_path / "run"
    _run("nemodiff_train.cli.train", "recipe=tiny_cpu", f"run.dir={run_dir}", "eval.at_end=true", "eval.limit=3",
         "eval.max_new_tokens=12", "eval.sweep.threshold=[]", "eval.commit_rule=prefix_ar",
         "eval.sweep.commit_rule=[confident]",
         "eval.probe.samples=2", "eval.probe.max_new_tokens=8", "eval.probe.task=arithmetic")
    hf = run_dir / "hf"
    # TPF during training: every validation row carries the decode probe and the mask-fill diagnostics
    val = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "val_ar_loss" in line]
    assert val and all(r["probe_linear_spec_lossless"] == 1.0 and r["probe_quadratic_spec_lossless"] == 1.0
                       for r in val)
    for r in val:
        assert r["probe_diffusion_tpf"] > 0 and 0 <= r["probe_ar_exact_match"] <= 1
        assert 0 <= r["val_masked_token_accuracy"] <= 1 and any(k.startswith("val_diffusion_ce_p") for k in r)
    # plain transformers loads the export (no remote code) and it carries the DLM settings
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["nemodiff"]["mask_token_id"] == 3 and cfg["nemodiff"]["recipe"] == "tiny_cpu"
    assert cfg["tie_word_embeddings"] is False
    # its causal logits are the trained weights': equal to the checkpoint loaded into the base architecture
    from nemodiff_train.engines.torch.checkpointing import load_model_weights
    from nemodiff_train.runs import latest_checkpoint
    from transformers import AutoConfig

    ref = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(run_dir / "hf_base")).float()
    load_model_weights(latest_checkpoint(run_dir), ref)
    ids = torch.randint(4, 4000, (1, 24))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)
    rows = json.loads((run_dir / "eval" / "eval.json").read_text())
    modes = {r["mode"]: r for r in rows if not r["sweep"]}
    assert set(modes) >= {"ar", "diffusion", "linear_spec", "quadratic_spec"}
    # the recipe's commit rule reaches the end-of-run evaluation, the swept one is a row beside it
    assert modes["diffusion"]["commit_rule"] == "prefix_ar"
    assert [(r["mode"], r["commit_rule"]) for r in rows if r["sweep"] == "commit_rule"] == [("diffusion", "confident")]
    for mode in ("linear_spec", "quadratic_spec"):
        assert modes[mode]["lossless"] == 1.0
    assert "| mode" in (hf / "README.md").read_text() or "TPF" in (hf / "README.md").read_text()
    # nemodiff-eval accepts the run directory itself
    _run("nemodiff_train.cli.evaluate", f"model={run_dir}", "modes=[ar,linear_spec]", f"out={tmp_path / 'ev'}",
         "limit=2", "max_new_tokens=8", "sweep.threshold=[]")
    assert (tmp_path / "ev" / "samples.jsonl").exists()
