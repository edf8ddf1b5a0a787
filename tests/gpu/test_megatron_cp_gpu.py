"""The Megatron engine's context parallelism on two GPUs (NCCL: the reduce-scatter path, flex-attention
with the local rows' ``BlockMask``): cp = 2 equals cp = 1 (:mod:`tests.megatron.support.cp_check --nccl`,
fp32). The same check runs on CPU with gloo in tests/megatron/test_megatron_context_parallel.py.
Not yet run on GPUs (none was lent when it was written)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gpu.test_megatron_gpu import _have_megatron

ROOT = Path(__file__).resolve().parents[2]
REL = 1e-4  # fp32 on GPU: flex-attention's tiles sum in another order than at cp = 1


def _cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_cuda_devices() < 2, reason=f"needs 2 CUDA devices for NCCL context parallelism "
                                                   f"(torch.cuda.device_count() = {_cuda_devices()})"),
    pytest.mark.skipif(not _have_megatron(), reason="needs megatron-bridge importable"),
]


def test_cp2_equals_cp1_on_two_gpus(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = tmp_path / "result.json"
    p = subprocess.run([sys.executable, "-m", "tests.megatron.support.cp_check", "--nccl", "--work", str(tmp_path),
                        "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.is_file(), (p.stdout + p.stderr)[-3000:]
    res = json.loads(out.read_text())
    print(f"MEGATRON_CP_GPU: {json.dumps(res)}")
    assert res["ok"] and res["backend"] == "nccl", res.get("traceback")
    for family in ("qwen3", "ministral3"):
        cp2, cp1 = res[family]["cp2"], res[family]["cp1"]
        for key in cp1:
            tol = 0 if key == "count" or key.endswith(".count") else REL * abs(cp1[key])
            assert abs(cp2[key] - cp1[key]) <= tol, (family, key, cp2[key], cp1[key])
        assert res[family]["max_grad_abs_diff"] <= REL * res[family]["max_grad_abs"], family
