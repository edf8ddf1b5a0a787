"""The real ``nemodiff-bench`` CLI as a subprocess on a CPU: the embedded model's shape, every mode,
batch 1 and 2 (self-speculation batched too), the HF generate baseline, the crossover, the speed-of-light report; and its refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MODES = ["ar", "diffusion", "linear_spec", "quadratic_spec"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "nemodiff_train.cli.bench", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_bench_embedded_shape_on_cpu(tmp_path, cache):
    out = tmp_path / "bench"
    res = _run([f"shape=embedded", f"out={out}", "prompt_len=12", "max_new_tokens=10", "block_size=4",
                "warmups=1", "runs=2", "batch_sizes=[1,2]", "sol_repeats=2", f"cache={cache}", "threads=1"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").stat().st_size > 0
    assert report["lm"] == {"dynamic": "HFCachedLM", "static": "StaticCachedLM"}[cache]
    assert report["complete"] is True  # bench.json is rewritten after every batch size, complete at the end
    assert report["cuda_graphs"] is False and report["hbm_tbps"] is None  # no roofline on a CPU
    rows = {(r["mode"], r["batch_size"]): r for r in report["results"]}
    assert set(rows) == {(m, b) for m in MODES + ["hf_generate"] for b in (1, 2)}  # every mode at every batch
    for (mode, batch), r in rows.items():
        assert r["generated_tokens"] == r["prompts"] * 10  # EOS ignored: every run makes max_new_tokens
        # num_prompts=1 (the default) per pass, rounded up to one whole batch: batch 1 decodes one prompt
        assert r["prompts"] == batch and r["tokens_per_s"]["n"] == 2 and r["tokens_per_s"]["median"] > 0
        if mode == "hf_generate":
            continue
        assert r["tpf"] == pytest.approx(r["generated_tokens"] / r["forwards"])
        by_q = r["forwards_by_q"]
        # model calls by query length: a batched call serves every row, and is counted for the rows that use it
        # (forwards are per row: a row that finished, or has nothing left to denoise, is not charged)
        calls = sum(n for k, n in by_q.items() if not k.endswith("prefill"))
        assert calls <= r["forwards"] <= calls * batch
        if mode == "ar":
            assert r["forwards"] == calls * batch
        assert sum(n for k, n in by_q.items() if k.endswith("prefill")) == r["prompts"] // batch
        # counted host syncs: one status read per cycle, plus the few reads of the results
        assert 0 < r["host_syncs_per_token"] * r["generated_tokens"] <= calls + 12
        assert r["model_calls"] == sum(by_q.values())
        assert r["predicted_tokens_per_s"] > 0 and r["measured_over_predicted"] > 0
        if mode.endswith("_spec"):
            assert r["same_as_ar"] == 1.0  # lossless at T = 0 (float32)
    assert rows[("ar", 1)]["forwards"] == 9  # 10 tokens, the first from the prefill
    costs = {(c["batch_size"], c["q"], c["prefill"]) for c in report["forward_cost"]}
    assert {(1, 1, False), (1, 4, False), (1, 20, False), (2, 1, False), (2, 20, False), (1, 12, True),
            (2, 12, True)} <= costs
    assert set(report["crossover"]) == {"linear_spec", "quadratic_spec"}  # first batch size not beating ar
    for cross in report["crossover"].values():
        assert cross["batch_size"] in (None, 1, 2) and cross["vs"] == "ar"


def test_bench_refuses_the_8b_shape_on_cpu_and_unknown_keys(tmp_path):
    res = _run(["shape=qwen3-8b", f"out={tmp_path}", "device=cpu"], tmp_path)
    assert res.returncode == 2 and "shape=qwen3-8b is a GPU benchmark" in res.stderr and "force=true" in res.stderr
    res = _run(["shape=embedded", "compile=true", "device=cpu", f"out={tmp_path}"], tmp_path)  # dynamic cache on a CPU
    assert res.returncode == 2 and "compile=true" in res.stderr and "cache=static" in res.stderr
    res = _run(["shape=embedded", "promt_len=3"], tmp_path)  # Hydra itself rejects a key the yaml lacks
    assert res.returncode != 0 and "promt_len" in res.stderr and not (tmp_path / "bench.json").exists()
    res = _run([f"out={tmp_path}"], tmp_path)
    assert res.returncode == 2 and "exactly one of model" in res.stderr
