"""``nemodiff-train adapter=lora`` end to end on a tiny model: the real CLI trains a drafter adapter,
checkpoints and resumes it, exports it, and the export reloaded on its untouched base decodes
self-speculation equal to plain transformers ``generate()`` of that base; torchrun (DDP, FSDP2) logs
the one-process losses."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.tiny_run import make_run_assets, tiny_cpu_args
from tests.integration.test_train_cli import _metrics, _train, _train_losses

pytestmark = pytest.mark.integration

MASK = 7  # a reserved id of the tiny tokenizer ('$'): an adapter never grows the base vocabulary


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_run_assets(tmp_path_factory.mktemp("adapter_assets"))


def _args(assets, run_dir, *extra):
    return tiny_cpu_args(assets, run_dir, "adapter=lora", "adapter.rank=4", f"model.mask_token_id={MASK}",
                         "stages.0.lr=1e-2", *extra)


@pytest.fixture(scope="module")
def adapter_run(assets, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("adapter_runs") / "one"
    _train(_args(assets, run_dir, "export.remote_code=true"))
    return run_dir


def test_adapter_run_trains_only_the_adapter_and_exports_it(assets, adapter_run):
    from transformers import AutoModelForCausalLM

    from nemodiff_train.decoding import DecodeConfig, generate
    from nemodiff_train.export import is_adapter_export, load_adapter_export
    from nemodiff_train.models.cached import HFCachedLM

    manifest = json.loads((adapter_run / "checkpoints" / "step_00000006" / "manifest.json").read_text())
    keys = json.dumps(manifest)
    assert "lora" in keys and "mask_embedding" in keys and "embed_tokens" not in keys  # adapter-only checkpoints
    val = [r["val_ar_loss"] for r in _metrics(adapter_run) if "val_ar_loss" in r]
    assert len(val) >= 2 and all(v == val[0] for v in val), f"the frozen base's AR loss moved: {val}"
    diff = [r["val_diffusion_loss"] for r in _metrics(adapter_run) if "val_diffusion_loss" in r]
    assert diff[-1] < diff[0], diff
    out = adapter_run / "hf"
    assert is_adapter_export(out) and not list(out.glob("model*.safetensors"))
    dlm = load_adapter_export(out)
    base = AutoModelForCausalLM.from_pretrained(assets / "model", dtype=torch.float32).eval()
    for key, value in base.state_dict().items():  # the base, bit for bit, under the trained adapter
        assert torch.equal(dlm.hf.state_dict()[key], value), key
    lm = HFCachedLM(dlm)
    for prompt in ([10, 20, 30, 40], [50, 60, 70, 80, 90, 100]):
        ref = base.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                            bad_words_ids=[[MASK]], eos_token_id=None, pad_token_id=1)[0, len(prompt):].tolist()
        for mode in ("linear_spec", "quadratic_spec"):
            got = generate(lm, [prompt], mode, DecodeConfig(max_new_tokens=12, block_size=4))[0].tokens
            assert got == ref, (mode, prompt)


def test_adapter_run_resumes_exactly_from_its_adapter_checkpoint(assets, tmp_path):
    """Killed in step 7 (NEMODIFF_FAULT), the run resumes from its adapter-only step-6 checkpoint (the
    frozen base reloaded from model.path) and logs the uninterrupted run's losses for steps 7 and 8."""
    import subprocess
    import sys

    from tests.integration.test_train_cli import _env

    ref = tmp_path / "ref"
    _train(_args(assets, ref, "stages.0.steps=8", "export.at_end=false"))
    run = tmp_path / "killed"
    args = _args(assets, run, "stages.0.steps=8", "export.at_end=false")
    killed = subprocess.run([sys.executable, "-m", "nemodiff_train.cli.train", *args], capture_output=True,
                            text=True, env=dict(_env(), NEMODIFF_FAULT="step:7:kill"), timeout=600)
    assert killed.returncode != 0 and (run / "checkpoints" / "step_00000006" / "COMPLETE").is_file()
    out = _train(args)
    assert "resuming from" in out.stdout + out.stderr
    a, b = _train_losses(run), _train_losses(ref)
    for step in (7, 8):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-6, abs=1e-7), step
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=1e-6, abs=1e-7), step


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_adapter_torchrun_two_processes_match_one(assets, adapter_run, tmp_path, strategy):
    run_dir = tmp_path / strategy
    _train(_args(assets, run_dir, "export.at_end=false", f"engine.distributed={strategy}"), torchrun=2)
    one, two = _train_losses(adapter_run), _train_losses(run_dir)
    assert one.keys() == two.keys()
    for step in one:
        for key in ("loss", "ar_loss", "diffusion_loss"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-4, abs=1e-5), (step, key)
