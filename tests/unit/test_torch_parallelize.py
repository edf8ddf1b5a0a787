"""The torch engine's parallelize step (precision, wrapping), its validation split and one-rank work."""

from __future__ import annotations

import pytest
import torch

from nemodiff_train.config.errors import ConfigError
from nemodiff_train.config.load import compose
from nemodiff_train.config.schema import Config
from nemodiff_train.engines.torch.distributed import DistEnv
from nemodiff_train.engines.torch.main_work import MainWork, MainWorkError
from nemodiff_train.engines.torch.parallelize import Precision, cpu_precision_note, parallelize, precision_plan
from nemodiff_train.engines.torch.loss import TwoStreamLoss
from nemodiff_train.engines.torch.validation import validation_split

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")
ONE = DistEnv(rank=0, world_size=1, local_rank=0, device=CPU)


def _cfg(**engine) -> Config:
    cfg = Config()
    for k, v in engine.items():
        section, key = k.split("__")
        setattr(getattr(cfg, section), key, v)
    return cfg


def test_precision_plan():
    assert precision_plan(_cfg(), CPU).compute == torch.float32
    assert precision_plan(_cfg(model__dtype="bfloat16"), CPU).compute == torch.bfloat16
    assert precision_plan(_cfg(), torch.device("cuda", 0)).compute == torch.bfloat16  # auto on CUDA
    assert precision_plan(_cfg(engine__precision="fp32"), torch.device("cuda", 0)).compute == torch.float32
    plan = precision_plan(_cfg(engine__precision="bf16"), CPU)
    assert (plan.compute, plan.param, plan.reduce) == (torch.bfloat16, torch.float32, torch.float32)
    with pytest.raises(ConfigError, match="engine.precision=fp32 contradicts model.dtype=bfloat16"):
        precision_plan(_cfg(engine__precision="fp32", model__dtype="bfloat16"), CPU)


def test_cpu_precision_note_says_whether_this_cpu_multiplies_bf16_natively(monkeypatch):
    bf16, fp32 = Precision(torch.bfloat16), Precision(torch.float32)
    assert cpu_precision_note(fp32, CPU) is None
    assert cpu_precision_note(bf16, torch.device("cuda", 0)) is None
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert ("native bf16 matmuls" in cpu_precision_note(bf16, CPU)) == native
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)  # a CPU without them
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert "slower than fp32; set engine.precision=fp32" in cpu_precision_note(bf16, CPU)


def _tiny_loss_module():
    from nemodiff_train.assets import embedded_model_dir
    from nemodiff_train.models.hf import load_dlm

    dlm = load_dlm(embedded_model_dir(), dtype=torch.float32, attn_implementation="sdpa")
    return TwoStreamLoss(dlm, block_size=8, chunk_size=64)


def test_parallelize_one_process_bf16_compute_fp32_weights():
    par = parallelize(_tiny_loss_module(), _cfg(model__dtype="bfloat16"), ONE)
    assert par.module is par.loss_module and not par.fsdp
    assert {p.dtype for p in par.module.parameters()} == {torch.float32}
    lin = par.loss_module.dlm.hf.get_output_embeddings()
    x = torch.randn(2, lin.in_features)
    with par.compute_context(CPU):
        assert lin(x).dtype == torch.bfloat16
    with parallelize(_tiny_loss_module(), _cfg(), ONE).compute_context(CPU):
        assert lin(x).dtype == torch.float32


def test_parallelize_refuses_low_precision_master_weights():
    module = _tiny_loss_module().to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32 master parameters"):
        parallelize(module, _cfg(model__dtype="bfloat16"), ONE)


@pytest.mark.parametrize("n, world, micro", [(5, 2, 1), (4, 3, 1), (7, 3, 2), (1, 3, 2), (8, 4, 2), (3, 8, 1)])
def test_validation_split_equal_forwards_every_row_once(n, world, micro):
    splits = [validation_split(n, world, r, micro) for r in range(world)]
    assert len({len(s) for s in splits}) == 1  # the same number of forwards on every rank
    assert all(len(b) == micro for s in splits for b in s)  # and the same rows per forward
    real = sorted(i for s in splits for b in s for i in b if i is not None)
    assert real == list(range(n))


def test_main_work_one_process_runs_inline(tmp_path):
    work = MainWork(ONE, tmp_path, timeout_s=1)
    assert work.run("x", lambda: "value") == "value"
    assert not (tmp_path / ".sync").exists()


def test_main_work_waiter_sees_failure_and_timeout(tmp_path):
    """A waiting rank (rank 1 here, no process group needed to wait on files) reports the worker's
    error, or the time-out naming the key."""
    waiter = MainWork.__new__(MainWork)
    waiter.env, waiter.timeout_s, waiter.poll_s = DistEnv(1, 2, 1, CPU), 0.3, 0.05
    waiter.dir = tmp_path / ".sync" / "abc"
    waiter.dir.mkdir(parents=True)
    with pytest.raises(MainWorkError, match="engine.main_work_timeout_s=0.3"):
        waiter.run("data_0", lambda: None)
    (waiter.dir / "data_0.failed").write_text("OSError: disk full")
    with pytest.raises(MainWorkError, match="disk full"):
        waiter.run("data_0", lambda: None)
    (waiter.dir / "model.node0.done").write_text('"/cache/model"')
    assert waiter.run("model", lambda: None, per_node=True) == "/cache/model"


@pytest.mark.parametrize("overrides, key", [
    (["recipe=tiny_cpu", "engine.compile=true"], "engine.compile"),
    (["recipe=nld_8b_sft", "engine.distributed=fsdp2"], "engine.distributed"),
    (["recipe=nld_3b_sft", "engine=torch", "engine.sequence_parallel=true"], "engine.sequence_parallel"),
    (["recipe=nld_3b_sft", "engine=torch", "engine.recompute=full"], "engine.recompute"),
    (["recipe=tiny_cpu", "engine.precision=fp32", "model.dtype=bfloat16"], "engine.precision"),
    (["recipe=tiny_cpu", "engine.dist_timeout_s=0"], "engine.dist_timeout_s"),
    (["recipe=nld_3b_sft", "export.push_to_hub=me/x"], "export.push_to_hub"),
    (["recipe=nld_3b_sft", "eval.at_end=true"], "eval.at_end"),
])
def test_keys_no_engine_honours_are_rejected(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose(overrides)


def test_recipe_engine_switch():
    assert compose(["recipe=nld_3b_sft"]).engine.distributed is None  # Megatron
    cfg = compose(["recipe=nld_3b_sft", "engine=torch", "engine.distributed=fsdp2"])
    assert (cfg.engine.name, cfg.engine.distributed, cfg.model.dtype) == ("torch", "fsdp2", "bfloat16")
