"""tools/bench_train_step.py on a prepared SFT split: the whole-row and the compacted DLM steps are
both timed, in the same process, and reported (no wall-clock threshold: the ratio is the result)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nemodiff_train.assets import embedded_model_dir

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_bench_train_step_times_the_compacted_step_on_prepared_rows(tmp_path):
    with gzip.open(ROOT / "nemodiff_train/assets/data/arithmetic_sft_train.jsonl.gz", "rt") as f:
        rows = [next(f) for _ in range(40)]
    (tmp_path / "chats.jsonl").write_text("".join(rows))
    subprocess.run([sys.executable, "-m", "nemodiff_train.data.cli", "sft", "--source", "chats.jsonl", "--tokenizer",
                    str(embedded_model_dir()), "--seq-len", "256", "--out", "prep"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, str(ROOT / "tools/bench_train_step.py"), "--prepared", "prep", "--batch", "2",
                    "--dtype", "bfloat16", "--block-size", "8", "--schedule", "position_dependent", "--repeats", "1",
                    "--json", "out.json"], cwd=tmp_path, check=True, capture_output=True, text=True)
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["rows"] == "prep" and out["seq_len"] == 256 and out["batch"] == 2
    assert out["dlm_step_ms"] > 0 and out["compact_step_ms"] > 0
    assert out["compact_speedup"] == pytest.approx(out["dlm_step_ms"] / out["compact_step_ms"], rel=1e-2)
