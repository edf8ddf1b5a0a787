"""The GPU check's logic on CPU: tests/gpu/test_megatron_gpu.py runs :mod:`tests.megatron.support.engine_check`
on CUDA; here the same parts run under the CPU emulation (gloo, fp32), so a lent GPU is never their
first run. What is asserted on CPU is what does not depend on the device: the job builds and trains
every iteration, ``init_from=hf`` starts from the HF weights (its first loss equals the torch
engine's, fp32), ``init_from=random`` loads nothing, and the measurements the GPU test reads exist.
"""

from __future__ import annotations

import math

import pytest

from tests.megatron.support.engine_check import run_part

pytestmark = pytest.mark.slow


def test_tiny_part_on_cpu(tmp_path):
    res, log = run_part("tiny", tmp_path, cpu=True, iters=6)
    assert res["ok"], res.get("error") or log[-3000:]
    assert res["iters"] == 6 and res["skipped"] == 0 and all(math.isfinite(x) for x in res["losses"])
    assert res["starts_from_the_base_weights"]  # engine.init_from=hf
    assert res["first_loss_rel_diff"] < 1e-4, (res["first_loss"], res["torch_engine_loss"])  # fp32: the same loss
    assert res["attention"] == "sdpa-cpu" and res["median_iter_ms"] > 0


def test_mfu_part_on_cpu(tmp_path):
    res, log = run_part("mfu", tmp_path, cpu=True, iters=2)
    assert res["ok"], res.get("error") or log[-3000:]
    assert res["iters"] == 2 and res["skipped"] == 0 and all(math.isfinite(x) for x in res["losses"])
    assert res["pretrained_checkpoint"] is None and res["perform_initialization"]  # engine.init_from=random
    assert res["hf_dir_is_the_config_only_source"]
    assert res["flops_per_iter"] > 0 and res["mfu"] is None  # no peak for a CPU: no MFU claimed
