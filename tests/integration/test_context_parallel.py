"""Context parallelism (``engine.cp``) equals the one-rank step: real gloo process groups on the CPU.

Each parametrisation spawns ``world`` processes (``world/cp`` data × ``cp`` context ranks) that run
every case through the engine's own pieces (tests/helpers/context_parallel.py) and compare with the
one-rank step of the same global batch: the loss, its sums, the masked-token and AR-target counts,
every parameter gradient (to 1e-5 of the largest gradient) and every local hidden state. Cases:
both two-stream patterns, both noise schedules, packed documents (boundaries inside chunks), a
uniform sliding window (Mistral), per-layer-type windows (Qwen2: one full, one windowed layer), and
the drafter adapter (LoRA on for the noisy positions only: its gate is sliced with the row).
"""

from __future__ import annotations

import json
import socket

import pytest

pytestmark = pytest.mark.integration

CASES = [
    dict(name="qwen3_two_stream_packed", arch="qwen3", pattern="two_stream", packed=True, schedule="uniform"),
    dict(name="qwen3_bd3", arch="qwen3", pattern="bd3", packed=False, schedule="position_dependent"),
    dict(name="mistral_window_two_stream_packed", arch="mistral_window", pattern="two_stream", packed=True,
         schedule="uniform"),
    dict(name="qwen2_layer_windows_bd3_packed", arch="qwen2_window", pattern="bd3", packed=True,
         schedule="position_dependent"),
    dict(name="qwen3_adapter_packed", arch="qwen3", pattern="two_stream", packed=True, schedule="uniform",
         adapter=True),
]
# Gemma-2 runs eager (attention-logit soft-capping), with alternating sliding and full layers
SLOW_CASES = [dict(name="gemma2_eager_windows_packed", arch="gemma2", pattern="two_stream", packed=True,
                   schedule="uniform")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world,cp,strategy", [
    (2, 2, "ddp"),
    pytest.param(4, 2, "ddp", marks=pytest.mark.slow),  # dp = 2 × cp = 2
    pytest.param(4, 2, "fsdp2", marks=pytest.mark.slow),  # with activation checkpointing
    pytest.param(4, 4, "ddp", marks=pytest.mark.slow),
])
def test_context_parallel_step_equals_one_rank(tmp_path, world, cp, strategy):
    import torch.multiprocessing as mp

    from tests.helpers.context_parallel import run_cases

    cases = [dict(case, strategy=strategy) for case in CASES + (SLOW_CASES if world > 2 else [])]
    mp.spawn(run_cases, args=(world, cp, _free_port(), cases, str(tmp_path)), nprocs=world)
    for case in cases:
        r = json.loads((tmp_path / f"{case['name']}.json").read_text())
        print(case["name"], strategy, f"world={world} cp={cp}", {k: v for k, v in r.items() if "diff" in k or "loss" in k})
        name = case["name"]
        assert r["masked"] == r["ref_masked"] > 0 and r["ar_count"] == r["ref_ar_count"] > 0, (name, r)
        assert r["denominator"] == r["ref_masked"] + r["ref_ar_count"], (name, r)
        for key in ("loss", "diffusion_sum", "ar_sum"):
            assert r[key] == pytest.approx(r[f"ref_{key}"], rel=1e-5), (name, key, r)
        assert r["grad_names"], name
        assert r["grad_max_abs_diff"] <= 1e-5 * r["grad_scale"], (name, r)
        assert r["hidden_max_abs_diff"] <= 1e-5, (name, r)
