"""The Megatron engine on one GPU, through its own ``build_job``/``launch`` (:mod:`tests.megatron.support.engine_check`).

* ``tiny``: >= 20 iterations of ``pretrain`` with the two-stream attention (flex-attention; the SDPA
  fallback is reported), bf16; the loss falls and the first loss equals the torch engine's (fp32, same
  global batch and weights) within 2 %; iteration time and peak memory are reported;
* ``mfu``: ``engine.init_from=random`` on a config-only ~1.2B Llama at 2L = 4096 tokens; MFU > 2 %.

Needs CUDA and megatron-core/bridge importable (installed, or the wheels ``tools/gpu_check.sh``
installs). Each part runs in its own process (one ``pretrain`` per process); its measurements are
printed, and written under the test's temporary directory. The same parts run on CPU in
tests/megatron/test_megatron_engine_check_cpu.py.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest


def _have_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _have_megatron() -> bool:
    try:
        return importlib.util.find_spec("megatron.bridge") is not None
    except (ImportError, ValueError):
        return False


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _have_cuda(), reason="needs CUDA (torch.cuda.is_available() is False)"),
    pytest.mark.skipif(not _have_megatron(), reason="needs megatron-bridge importable (pip install, or "
                                                    "tools/gpu_check.sh with the carried wheels)"),
]


def _run(part, tmp_path, **kw):
    from tests.megatron.support.engine_check import run_part

    res, log = run_part(part, tmp_path, cpu=False, **kw)
    print(f"MEGATRON_GPU_{part.upper()}: {json.dumps(res)}")
    assert res["ok"], res.get("error") or log[-3000:]
    return res


def test_tiny_trains_and_matches_the_torch_engine(tmp_path):
    res = _run("tiny", tmp_path, iters=24, timeout=300)
    assert res["iters"] == 24 and res["skipped"] == 0 and all(math.isfinite(x) for x in res["losses"])
    assert res["loss_last_window"] < res["loss_first_window"] - 0.1, res["losses"]
    assert res["first_loss_rel_diff"] <= 2e-2, (res["first_loss"], res["torch_engine_loss"])  # bf16
    assert res["attention"] in ("flex", "sdpa-fallback") and res["peak_mem_gib"] > 0


def test_random_init_1b_mfu(tmp_path):
    res = _run("mfu", tmp_path, iters=6, timeout=300)
    assert res["iters"] == 6 and all(math.isfinite(x) for x in res["losses"])
    assert res["pretrained_checkpoint"] is None and res["perform_initialization"]
    assert res["params_b"] >= 1.0 and res["mfu"] is not None and res["mfu"] > 0.02, res
