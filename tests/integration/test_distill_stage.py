"""``nemodiff-train`` with a ``distill`` stage on the embedded model: the base answers the prompts,
the answers are prepared as SFT rows (loss on the answers only) and the stage trains on them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nemodiff_train.assets import embedded_model_dir
from nemodiff_train.data.format import open_split_arrays, read_meta
from nemodiff_train.data.tokenizer import load_tokenizer

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["recipe=tiny_cpu", f"run.dir={run_dir}", "export.at_end=false", "stages.0.name=distill",
            "stages.0.kind=distill", "stages.0.data.kind=distill", "stages.0.steps=2", "stages.0.data.max_documents=null",
            "stages.0.data.sources=[embedded:arithmetic_sft_train.jsonl.gz]",
            "stages.0.data.val_sources=[embedded:arithmetic_sft_val.jsonl.gz]", "stages.0.data.seq_len=192",
            "stages.0.data.distill.max_prompts=6", "stages.0.data.distill.batch_size=6",
            "stages.0.data.distill.max_new_tokens=104", "checkpoint.every=2", "logging.val_every=2", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("NEMODIFF_FAULT", None)
    return subprocess.run([sys.executable, "-m", "nemodiff_train.cli.train", *args], env=env, capture_output=True,
                          text=True, timeout=900)


def test_a_distill_stage_generates_prepares_and_trains(tmp_path):
    run = tmp_path / "run"
    out = _train(run)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2]

    generated = json.loads((run / "data" / "distill.distill" / "meta.json").read_text())
    assert generated["teacher"]["kind"] == "base" and generated["teacher"]["path"] == "embedded"
    assert [s["prompts"] for s in generated["sources"]] == [6, 6]
    answers = [json.loads(x) for x in (run / "data" / "distill.distill" / "rows" / "src0.jsonl").read_text().splitlines()]

    prepared = read_meta(run / "data" / "distill")
    assert prepared["kind"] == "sft" and prepared["sources"][0]["name"].startswith("distill:")
    assert prepared["sources"][0]["documents"] == len(answers) == 6
    # the supervised tokens are exactly the teacher's answers, each followed by the turn end <|im_end|>
    tok = load_tokenizer(str(embedded_model_dir()))
    arrays = open_split_arrays(run / "data" / "distill", "train")
    supervised = sorted(tuple(int(t) for t in arrays["tokens"][r][(arrays["docs"][r] == d) & (arrays["loss_mask"][r] == 1)])
                        for r in range(arrays["tokens"].shape[0]) for d in np.unique(arrays["docs"][r])
                        if ((arrays["docs"][r] == d) & (arrays["loss_mask"][r] == 1)).any())
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert supervised == sorted(tuple(a["response_tokens"]) + (im_end,) for a in answers)

    again = _train(run, "stages.0.steps=3")  # one more step: the set and the prepared data are reused
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "distill set already generated with this spec" in again.stdout + again.stderr

    changed = _train(run, "stages.0.steps=4", "stages.0.data.distill.temperature=0.5")
    assert changed.returncode != 0 and "generated from a different spec" in changed.stdout + changed.stderr


def test_teacher_current_answers_with_the_weights_at_the_stage_start(tmp_path):
    """``teacher: current``: the model being trained answers with the weights it has when the distill
    stage starts (after the pretraining stage), checked against an export of the checkpoint at that step
    decoded by the toolkit's AR decoder; and those answers differ from the untouched base's."""
    import torch

    from nemodiff_train.decoding import DecodeConfig, generate
    from nemodiff_train.export import export_checkpoint
    from nemodiff_train.models.cached import HFCachedLM
    from nemodiff_train.models.hf import load_dlm

    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("NEMODIFF_FAULT", None)
    pretrain = ("{name: pretrain, kind: pretrain, steps: 2, lr: 3.0e-3, global_batch_size: 4, micro_batch_size: 2, "
                "data: {kind: pretrain, sources: ['embedded:pretrain_train.jsonl.gz'], seq_len: 32, max_documents: 40}}")
    distill = ("{name: distill, kind: distill, steps: 1, global_batch_size: 2, micro_batch_size: 2, "
               "data: {kind: distill, sources: ['embedded:arithmetic_sft_train.jsonl.gz'], seq_len: 192, "
               "distill: {teacher: current, max_prompts: 12, batch_size: 12, max_new_tokens: 104}}}")
    args = ["recipe=tiny_cpu", f"run.dir={run}", "export.at_end=false", f"stages=[{pretrain},{distill}]",
            "checkpoint.every=2", "logging.val_every=0"]
    out = subprocess.run([sys.executable, "-m", "nemodiff_train.cli.train", *args], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    answers = [json.loads(x) for x in (run / "data" / "distill.distill" / "rows" / "src0.jsonl").read_text().splitlines()]
    assert json.loads((run / "data" / "distill.distill" / "meta.json").read_text())["teacher"]["kind"] == "current"

    hf = export_checkpoint(run / "checkpoints" / "step_00000002", tmp_path / "hf_step2")
    stage_start = load_dlm(hf, dtype=torch.float32, attn_implementation="sdpa")
    base = load_dlm(embedded_model_dir(), dtype=torch.float32, attn_implementation="sdpa")
    meta = json.loads((run / "data" / "distill.distill" / "meta.json").read_text())
    tok = load_tokenizer(str(embedded_model_dir()))
    prompts = [list(tok.apply_chat_template(a["messages"][:-1], tokenize=True, return_dict=True,
                                            add_generation_prompt=True)["input_ids"]) for a in answers]
    cfg = DecodeConfig(max_new_tokens=104, eos_token_ids=tuple(meta["stop_ids"]))
    expected = [list(r.tokens) for r in generate(HFCachedLM(stage_start), prompts, "ar", cfg)]
    untouched = [list(r.tokens) for r in generate(HFCachedLM(base), prompts, "ar", cfg)]
    got = [a["response_tokens"] + [a["stop_token"]] for a in answers]
    assert expected == got  # answers that reached max_new_tokens were left out: compare the kept ones
    assert untouched != got
