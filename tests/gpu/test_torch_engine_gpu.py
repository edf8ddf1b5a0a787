"""The torch engine on CUDA (bf16 autocast, flex-attention BlockMask through HF's own modules): the
tiny_cpu recipe for 30 steps through the real ``nemodiff-train`` entry point, checkpoints and
validation included."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_tiny_recipe_trains_on_cuda(tmp_path):
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "nemodiff_train.cli.train", "recipe=tiny_cpu", f"run.dir={run}",
                        "engine.device=cuda", "stages.0.steps=30", "checkpoint.every=15", "logging.val_every=10",
                        "export.at_end=false"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "WANDB_MODE": "disabled",  # keep the caller's path (wheels carried there)
                            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if "loss" in r]
    print(f"TORCH_ENGINE_CUDA: losses {train}")
    assert len(train) == 30 and all(math.isfinite(x) for x in train)
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5
    assert any("val_loss" in r for r in rows)
