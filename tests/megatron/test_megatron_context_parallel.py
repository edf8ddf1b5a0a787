"""The Megatron engine with context parallelism (cp = 2, 2 gloo processes) equals cp = 1.

:mod:`tests.megatron.support.cp_check` builds the engine's own Megatron models (tiny Qwen3:
Megatron's ``GPTModel``, whose row the forward step slices; tiny Ministral-3: the multimodal wrapper,
which slices the row itself) with HF weights, on packed documents with an SFT-style prompt, and runs the engine's forward step and loss function at
``context_parallel_size`` 2 and 1 on the same batch. With cp = 2 each rank holds half of every
``[x_t ; x_0]`` row in Megatron's order; sums, token counts and gradients summed over the CP group
(Megatron's ``dp_cp`` reductions) must equal the one-rank step's. Subprocess: Megatron's parallel
state is global, and the test needs two ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
REL = 1e-5


def test_cp2_loss_counts_and_gradients_equal_cp1(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = tmp_path / "result.json"
    p = subprocess.run([sys.executable, "-m", "tests.megatron.support.cp_check", "--work", str(tmp_path),
                        "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.is_file(), (p.stdout + p.stderr)[-3000:]
    res = json.loads(out.read_text())
    assert res["ok"], res.get("traceback")
    for family in ("qwen3", "ministral3"):
        r = res[family]
        assert r["local_ce_shape_cp2"] == [2, 32] and r["ce_shape_cp1"] == [2, 64], family  # half a row per rank
        cp2, cp1 = r["cp2"], r["cp1"]
        assert cp2.keys() == cp1.keys()
        for key in cp1:
            if key == "count" or key.endswith(".count"):  # token and masked-token counts: exact
                assert cp2[key] == cp1[key] > 0, (family, key)
            else:
                assert abs(cp2[key] - cp1[key]) <= REL * abs(cp1[key]), (family, key, cp2[key], cp1[key])
        assert r["trained_params"] > 0
        assert r["max_grad_abs_diff"] <= REL * r["max_grad_abs"], (family, r["max_grad_abs_diff"], r["max_grad_abs"])
