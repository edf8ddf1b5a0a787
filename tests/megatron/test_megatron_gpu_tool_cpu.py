"""``tools/gpu_megatron_check.py --cpu-emulate``: the GPU check script itself, run end to end on CPU
(its parts in subprocesses, Megatron on gloo/fp32), so the single GPU run is not its first run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_gpu_check_script_runs_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "NEMODIFF_MB_SITE": str(tmp_path / "site")}
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_megatron_check.py"), "--cpu-emulate",
                        "--tiny-iters", "10", "--mfu-iters", "2", "--out", str(out), "--work", str(tmp_path / "work")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    summary = json.loads((out / "megatron_gpu.json").read_text())
    assert summary["verdict"] == "PASS", (summary, p.stdout[-3000:])
    tiny = summary["tiny"]
    assert tiny["iters"] == 10 and tiny["first_loss_rel_diff"] < 1e-5  # fp32: Megatron == torch engine
    assert summary["mfu"]["iters"] == 2
    assert "MEGATRON_GPU: PASS" in p.stdout
