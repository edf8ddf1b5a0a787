"""The real ``nemodiff-train`` output of a two-stage run written to a log (not a terminal): read top to
bottom it says what each stage did, with no progress-bar control codes and nothing that looks like a
failure (the single-process torch.distributed warning, a second export line)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_two_stage_log_reads_top_to_bottom(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "nemodiff_train.cli.train", "recipe=demo_cpu", f"run.dir={run}",
           "stages.0.steps=2", "stages.1.steps=2", "stages.0.data.max_documents=20",
           "stages.1.data.max_documents=200", "logging.every=1", "logging.val_every=2", "logging.val_batches=1",
           "checkpoint.every=2", "eval.at_end=false",
           "eval.probe.samples=1", "eval.probe.max_new_tokens=24"]  # a short probe: its log lines, not its TPF
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    out, err = res.stdout, res.stderr
    for text in (out, err):
        assert "\r" not in text and "\x1b" not in text  # no tqdm redraws or cursor codes in a log
        assert "single process" not in text and "return func(" not in text
        assert "Loading weights" not in text and "Writing model shards" not in text
    lines = out.splitlines()

    def at(prefix: str) -> int:
        return next(i for i, line in enumerate(lines) if line.startswith(prefix))

    s1, s2 = at("stage 1/2 pretrain: steps 1-2"), at("stage 2/2 sft: steps 3-4")
    v0 = at("  step 0 validation (pretrain, the base model before training): AR loss ")
    p1, v2 = at("  pretrain step 1/2 | loss "), at("  step 2 validation (pretrain): ")
    drops = next(i for i, line in enumerate(lines) if "conversations longer than seq_len=256 tokens left out, see "
                 in line)
    sv, sp = at("  step 2 validation (sft, before this stage)"), at("  sft step 2/2 | loss ")
    exported = at("exported ")
    assert s1 < v0 < p1 < v2 < s2 < drops < sv < sp < exported
    assert "over-long-tokens" not in out  # the policy, not an error code
    assert sum(line.startswith("exported") for line in lines) == 1
    assert lines[exported] == f"exported {run / 'hf'}"
    # the sft stage's first validation (step 2, same weights as pretrain's last) re-measures the losses on
    # the sft data but reuses the decode probe's row instead of decoding again (its timing is copied too)
    import json

    at_2 = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r.get("step") == 2 and "val_ar_loss" in r]
    assert [r["stage"] for r in at_2] == ["pretrain", "sft"]
    probe = [{k: v for k, v in r.items() if k.startswith("probe_")} for r in at_2]
    assert probe[0] and probe[0] == probe[1] and at_2[0]["val_ar_loss"] != at_2[1]["val_ar_loss"]
