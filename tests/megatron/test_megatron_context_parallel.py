"""The Megatron engine with context parallelism (cp = 2, 2 gloo processes) equals cp = 1.

:mod:`tests.megatron.support.cp_check` builds the engine's own Megatron models (tiny Qwen3:
Megatron's ``GPTModel``, whose row the forward step slices; tiny Ministral-3: the multimodal wrapper,
which slices the row itself) with HF weights, on packed documents with an SFT-style prompt, and runs the engine's forward step and loss function at
``context_parallel_size`` 2 and 1 on the same batch. With cp = 2 each rank holds half of every
``[x_t ; x_0]`` row in Megatron's order; sums, token counts and gradients summed over the CP group
(Megatron's ``dp_cp`` reductions) must equal the one-rank step's. Subprocess: Megatron's parallel
state is global, and the test needs two ranks.

A second test runs Megatron-Bridge's real ``pretrain()`` (:mod:`tests.megatron.support.cpu_train`, CPU
emulation) on the tiny_cpu recipe: one process with cp = 1, and two processes (torchrun) with ``engine.cp=2`` in
two jobs (stopped by SIGTERM after the first step, then resumed from its checkpoint); every logged
loss, the gradient norm (after the first optimizer step too) and the validation losses of
``metrics.jsonl`` must agree.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.tiny_models import save_tiny_model
from tests.helpers.tiny_tokenizer import make_tiny_tokenizer

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


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_with_cp2_logs_the_losses_of_cp1(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    base = tmp_path / "base"
    save_tiny_model(base, "qwen3", vocab_size=len(make_tiny_tokenizer(base)), tie=True, initializer_range=0.1)
    args = ["recipe=tiny_cpu", "engine=megatron", "engine.device=cpu", f"model.path={base}", "checkpoint.every=100",
            "export.at_end=false", "stages.0.steps=2"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one_rank = [sys.executable, "-m", "tests.megatron.support.cpu_train", *args, f"run.dir={tmp_path / 'cp1'}"]
    two_ranks = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                 "-m", "tests.megatron.support.cpu_train", "--torchrun", *args, "engine.cp=2",
                 f"run.dir={tmp_path / 'cp2'}"]
    # cp = 2 in two jobs: SIGTERM after the first step (checkpoint, exit 0), then the same command resumes
    # (cpu_train's --signal is left at SIGTERM: torchrun's parser would take "--signal" for its own option)
    for cmd in (one_rank, two_ranks + ["--sigterm-at-step", "0"], two_ranks):
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, (cmd, (p.stdout + p.stderr)[-3000:])
    assert "at iteration 1" in p.stdout + p.stderr  # the second cp = 2 job resumed from the first one's checkpoint
    one, two = _metrics(tmp_path / "cp1"), _metrics(tmp_path / "cp2")
    assert [m["step"] for m in one] == [m["step"] for m in two] == [1, 2, 2]  # two steps, then validation
    for a, b in zip(one, two):
        for key in ("loss", "ar_loss", "diffusion_loss", "grad_norm", "val_loss", "val_ar_loss", "val_diffusion_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= REL * abs(a[key]), (a["step"], key, a[key], b[key])
