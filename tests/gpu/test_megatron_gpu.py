"""The Megatron engine on one GPU: ``tools/gpu_megatron_check.py`` (pretrain >= 20 iterations of a tiny
model with the two-stream attention, first loss vs the torch engine, loss falls, iteration time and
memory, MFU of a ~1.2B model). Needs CUDA; megatron-core/bridge installed or carried as wheels in
``.device/wheels`` (the tool installs them into a private site directory).

On the GPU machine the lead runs the tool directly (it writes ``$OUT/megatron_gpu.json``); this test is
the same check for a CI runner with a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.gpu


def _have_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _have_megatron() -> bool:
    import importlib.util

    try:
        if importlib.util.find_spec("megatron.bridge") is not None:
            return True
    except (ImportError, ValueError):
        pass
    return any((ROOT / ".device" / "wheels").glob("megatron_bridge-*.whl"))


@pytest.mark.skipif(not _have_cuda(), reason="needs CUDA")
@pytest.mark.skipif(not _have_megatron(), reason="needs megatron-bridge (installed, or wheels in .device/wheels)")
def test_megatron_engine_on_one_gpu(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_megatron_check.py"), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=330, env={**os.environ})
    summary = json.loads((out / "megatron_gpu.json").read_text())
    tiny, mfu = summary["tiny"], summary["mfu"]
    assert tiny["ok"], (tiny, p.stdout[-2000:])
    assert tiny["iters"] >= 20 and tiny["loss_last3"] < tiny["loss_first3"]
    assert tiny["first_loss_rel_diff"] <= tiny["tolerance"]
    assert mfu["ok"] and mfu["params_b"] >= 1.0 and mfu["mfu"] is not None, mfu
    assert summary["verdict"] == "PASS"
