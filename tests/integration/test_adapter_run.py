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
    from nemodiff_train.models.adapter_export import is_adapter_export, load_adapter_export
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


def test_adapter_run_resumes_exactly_from_its_adapter_checkpoint(assets, adapter_run, tmp_path):
    """Killed in step 5 (NEMODIFF_FAULT), the run resumes from its adapter-only step-4 checkpoint (the
    frozen base reloaded from model.path) and logs the uninterrupted run's losses for steps 5 and 6
    (the module's adapter run: same recipe and steps; its export settings do not touch training)."""
    import subprocess
    import sys

    from tests.integration.test_train_cli import _env

    run = tmp_path / "killed"
    args = _args(assets, run, "export.at_end=false")
    killed = subprocess.run([sys.executable, "-m", "nemodiff_train.cli.train", *args], capture_output=True,
                            text=True, env=dict(_env(), NEMODIFF_FAULT="step:5:kill"), timeout=600)
    assert killed.returncode != 0 and (run / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
    assert not (run / "checkpoints" / "step_00000006").exists()
    out = _train(args)
    assert "resuming from" in out.stdout + out.stderr
    a, b = _train_losses(run), _train_losses(adapter_run)
    for step in (5, 6):
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


CHILD = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM

path, base_path, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
res = {"module": type(model).__module__, "modes": {}, "base": []}
for p in prompts:
    ids = torch.tensor([p])
    for mode in ["ar", "diffusion", "linear_spec", "quadratic_spec"]:
        out = model.generate(ids, mode=mode, max_new_tokens=12, block_size=4, eos_token_id=[],
                             return_dict_in_generate=True)
        res["modes"].setdefault(mode, []).append(out.tokens[0])
    ref = base.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, bad_words_ids=[[%d]],
                        eos_token_id=None, pad_token_id=1)
    res["base"].append(ref[0, len(p):].tolist())
print("RESULT " + json.dumps(res))
""" % MASK


def test_adapter_export_through_transformers_trust_remote_code(assets, adapter_run, tmp_path):
    """A fresh interpreter that cannot import nemodiff_train: AutoModelForCausalLM.from_pretrained(<adapter
    dir>, trust_remote_code=True) loads the base + adapter; every mode equals our decoders on the package's
    load of the same export, and self-speculation equals plain generate() of the untouched base."""
    import os
    import subprocess
    import sys

    from nemodiff_train.decoding import DecodeConfig, generate
    from nemodiff_train.models.adapter_export import load_adapter_export
    from nemodiff_train.models.cached import HFCachedLM

    prompts = [[10, 20, 30, 40], [50, 60, 70, 80, 90, 100]]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    env.pop("PYTHONPATH", None)
    res = subprocess.run([sys.executable, "-c", CHILD, str(adapter_run / "hf"), str(assets / "model"),
                          json.dumps(prompts)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-5000:]
    got = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert got["module"].startswith("transformers_modules.")
    lm = HFCachedLM(load_adapter_export(adapter_run / "hf"))
    for mode, outputs in got["modes"].items():
        ours = [generate(lm, [p], mode, DecodeConfig(max_new_tokens=12, block_size=4))[0].tokens for p in prompts]
        assert outputs == ours, mode
    assert got["modes"]["linear_spec"] == got["base"] and got["modes"]["quadratic_spec"] == got["base"]


def test_check_against_base_tool_compares_with_plain_generate(assets, adapter_run, tmp_path, capsys):
    """tools/check_against_base.py: the adapter's self-speculation outputs from nemodiff-eval equal plain
    transformers generate() of the untouched base (exit 0); one altered output token is caught (exit 1)."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.integration.test_train_cli import _env

    root = Path(__file__).resolve().parents[2]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p, "reference": "x"}) + "\n" for p in ("abc", "hello there")))
    out = tmp_path / "eval"
    ev = subprocess.run([sys.executable, "-m", "nemodiff_train.cli.evaluate", f"model={adapter_run}", f"task={rows}",
                         "modes=[ar,linear_spec,quadratic_spec]", "max_new_tokens=10", "block_size=4",
                         "sweep.threshold=[]", "chat_template=false", f"out={out}"],
                        capture_output=True, text=True, env=_env(), timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    tool = [sys.executable, str(root / "tools" / "check_against_base.py"), str(out), "--base", str(assets / "model")]
    ok = subprocess.run(tool, capture_output=True, text=True, env=_env(), timeout=600)
    assert ok.returncode == 0 and "4 of 4 samples" in ok.stdout, ok.stdout + ok.stderr[-3000:]

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    victim = next(s for s in samples if s["mode"] == "quadratic_spec")
    victim["output_ids"][-1] += 1
    (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    # the same tool in this process (its main(argv); the command line ran above): one process start less
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_against_base", root / "tools" / "check_against_base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(tool[2:]) == 1
    printed = capsys.readouterr().out
    assert "MISMATCH" in printed and "3 of 4 samples" in printed, printed
