"""The architecture matrix through the real code path: train → export → eval, checked against transformers.

Every matrix entry (tests/helpers/arch_matrix.py) is saved as a model directory with the tiny
tokenizer, trained for two steps, exported and evaluated; the export is then loaded with plain
``AutoModelForCausalLM`` and its ``generate()`` must reproduce ``nemodiff-eval``'s ``ar`` outputs token
for token, and both self-speculation modes must be lossless. The entries with a feature the toolkit
used to get wrong (Gemma-2: eager only, alternating windows, soft-capping; Granite: logits_scaling;
Qwen2: windows on some layers) go through the real CLIs
(``nemodiff-train``, ``nemodiff-eval`` as subprocesses; training exports at the end), the others
through the same library functions in-process (``build_model``'s ``load_dlm``, the engine's
``TwoStreamLoss``, ``export_checkpoint``, ``run_evaluation``) to keep the tier fast.
Also here: user errors at the ``nemodiff-train`` command line are one line, with no traceback and no
run directory left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.arch_matrix import ARCHS, save_arch_model
from tests.helpers.tiny_run import write_text_jsonl

# slow: a training run per architecture; tests/unit/test_arch_*.py keep every family in the default selection
pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
CLI_ARCHS = ("gemma2", "granite", "qwen2_window")
NEW_TOKENS = 12


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))


def _cli(module: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", f"nemodiff_train.cli.{module}", *args], capture_output=True,
                         text=True, env=_env(), timeout=3600)  # a hang guard only: shared CI boxes can be slow
    if check and out.returncode != 0:
        raise AssertionError(f"{module} {args} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch_data")
    write_text_jsonl(root / "train.jsonl", 40)
    write_text_jsonl(root / "val.jsonl", 8, seed=1)
    with open(root / "task.jsonl", "w") as f:
        for prompt in ("def return self value import class for in if", "print data index list item key while"):
            f.write(json.dumps({"prompt": prompt, "reference": "x"}) + "\n")
    return root


def _eval_args(model: Path, out: Path, task: Path) -> dict:
    return dict(model=str(model), out=str(out), modes=["ar", "linear_spec", "quadratic_spec"], task=str(task),
                limit=2, max_new_tokens=NEW_TOKENS, block_size=4, chat_template=False, device="cpu")


def _train_cli(model_dir: Path, run_dir: Path, data: Path) -> Path:
    _cli("train", "recipe=tiny_cpu", f"run.dir={run_dir}", f"model.path={model_dir}",
         f"stages.0.data.sources=[{data / 'train.jsonl'}]", f"stages.0.data.val_sources=[{data / 'val.jsonl'}]",
         "stages.0.steps=2", "checkpoint.every=2", "logging.val_every=0", "export.at_end=true", "eval.at_end=false")
    return run_dir / "hf"


def _train_in_process(model_dir: Path, work: Path) -> Path:
    """Two optimizer steps of the engine's loss module on packed rows (two documents each), then the export."""
    from nemodiff_train.core.losses import LossWeights
    from nemodiff_train.models.step import collate
    from nemodiff_train.engines.torch.loss import TwoStreamLoss
    from nemodiff_train.export import export_checkpoint
    from nemodiff_train.models.hf import load_dlm

    dlm = load_dlm(model_dir, settings={"train_block_size": 8, "inference_block_size": 4})
    dlm.hf.train()
    loss_module = TwoStreamLoss(dlm, 8, 2048)
    optim = torch.optim.AdamW(dlm.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    vocab = dlm.hf.get_input_embeddings().weight.shape[0]
    weights = LossWeights()
    for step in range(2):
        rows = [{"input_ids": torch.randint(4, vocab - 1, (32,), generator=g), "doc_ids": [0] * 12 + [1] * 20,
                 "loss_mask": [1] * 32} for _ in range(2)]
        mb = collate(rows, [2 * step, 2 * step + 1], seed=0, mask_token_id=dlm.settings.mask_token_id,
                     schedule="uniform", eps=1e-3, block_size=8, half_life_ratio=0.25)
        parts = loss_module(mb)
        loss = parts.numerator(weights) / parts.denominator(weights)
        assert torch.isfinite(loss)
        optim.zero_grad()
        loss.backward()
        optim.step()
    dlm.hf.eval()
    trained = work / "trained"
    dlm.hf.config.nemodiff = {"mask_token_id": dlm.settings.mask_token_id, "train_block_size": 8,
                              "inference_block_size": 4, "attention_pattern": "two_stream"}
    dlm.hf.save_pretrained(trained)
    dlm.tokenizer.save_pretrained(trained)
    export_checkpoint(str(trained), work / "hf")
    return work / "hf"


def _check_export_and_eval(export: Path, eval_out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export)
    assert {"<|im_start|>", "<|im_end|>", "<|mask|>"} <= set(tok.all_special_tokens)
    rows = {r["mode"]: r for r in json.loads((eval_out / "eval.json").read_text())}
    assert rows["linear_spec"]["lossless"] == 1.0 and rows["quadratic_spec"]["lossless"] == 1.0
    mask_id = json.loads((export / "config.json").read_text())["nemodiff"]["mask_token_id"]
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()  # plain transformers
    samples = [json.loads(line) for line in (eval_out / "samples.jsonl").read_text().splitlines()]
    ar = [s for s in samples if s["mode"] == "ar"]
    assert len(ar) == 2
    eos = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    for s in ar:
        prompt = torch.tensor([s["prompt_ids"]])
        out = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, suppress_tokens=[mask_id],
                             eos_token_id=eos, pad_token_id=tok.pad_token_id)
        assert out[0, prompt.shape[1]:].tolist() == s["output_ids"]


@pytest.mark.parametrize("name", CLI_ARCHS)
def test_cli_train_export_eval(name, data, tmp_path):
    model_dir = save_arch_model(tmp_path / "base", name)
    export = _train_cli(model_dir, tmp_path / "run", data)
    _cli("evaluate", *[f"{k}={json.dumps(v) if isinstance(v, list) else v}".replace('"', "")
                       for k, v in _eval_args(export, tmp_path / "eval", data / "task.jsonl").items()])
    _check_export_and_eval(export, tmp_path / "eval")


@pytest.mark.parametrize("name", [n for n in sorted(ARCHS) if n not in CLI_ARCHS])
def test_library_train_export_eval(name, data, tmp_path):
    from nemodiff_train.eval.runner import EvalConfig, run_evaluation

    model_dir = save_arch_model(tmp_path / "base", name)
    export = _train_in_process(model_dir, tmp_path)
    run_evaluation(EvalConfig(**_eval_args(export, tmp_path / "eval", data / "task.jsonl")))
    _check_export_and_eval(export, tmp_path / "eval")


def _one_line_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip() and "torchvision" not in line]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_train_cli_user_errors_are_one_line_and_leave_no_run_dir(tmp_path):
    missing = tmp_path / "no_such_model"
    run_dir = tmp_path / "runs" / "never"
    _one_line_error(_cli("train", "recipe=tiny_cpu", f"run.dir={run_dir}", f"model.path={missing}", check=False),
                    "model.path", str(missing))
    assert not run_dir.exists()
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    _one_line_error(_cli("train", "recipe=tiny_cpu", f"run.dir={run_dir}", f"model.path={encoder}", check=False),
                    "model.path", str(encoder), "encoder")
    assert not run_dir.exists()
    no_weights = tmp_path / "no_weights"
    save_arch_model(no_weights, "llama_untied")
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    _one_line_error(_cli("train", "recipe=tiny_cpu", f"run.dir={run_dir}", f"model.path={no_weights}", check=False),
                    "model.path", str(no_weights))
    assert not run_dir.exists()
