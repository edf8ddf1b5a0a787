"""A distill set's generation killed with SIGKILL mid-chunk resumes to exactly the uninterrupted set.

The killed generation runs in a real subprocess (``NEMODIFF_FAULT=distill:<n>`` sends SIGKILL to it
after the n-th atomic write is on disk but before its rename); the reference and the resumption run
here. Sampled decoding (temperature 0.9, top-p 0.95), so a resumption that drew other random numbers
for the remaining prompts would show.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemodiff_train.data.distill import DistillSettings, generate_distill_set
from nemodiff_train.data.distill_teacher import base_teacher_identity, load_base_teacher
from nemodiff_train.data.sources import SourceSpec
from tests.helpers.tiny_run import make_model_dir

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parents[2]

_SETTINGS = dict(prompt_field="prompt", max_new_tokens=6, temperature=0.9, top_p=0.95, seed=7, batch_size=3)
_STOPS = tuple(range(0, 320, 3))  # a third of the tiny vocabulary ends an answer: most end within 6 tokens

_GENERATE = f"""
import sys
from nemodiff_train.data.distill import DistillSettings, generate_distill_set
from nemodiff_train.data.distill_teacher import base_teacher_identity, load_base_teacher
from nemodiff_train.data.sources import SourceSpec
model_dir, prompts, out = sys.argv[1:4]
generate_distill_set(SourceSpec(prompts), lambda: load_base_teacher(model_dir), model_dir, {_STOPS!r},
                     DistillSettings(**{_SETTINGS!r}), out, teacher_identity=base_teacher_identity(model_dir), log=None)
"""


def _generate_here(model_dir: Path, prompts: Path, out: Path):
    return generate_distill_set(SourceSpec(str(prompts)), lambda: load_base_teacher(str(model_dir)), str(model_dir),
                                _STOPS, DistillSettings(**_SETTINGS), out,
                                teacher_identity=base_teacher_identity(str(model_dir)), log=None)


def test_a_generation_killed_mid_chunk_resumes_to_the_uninterrupted_set(tmp_path):
    d = make_model_dir(tmp_path / "model")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"print the data item {i}"}) + "\n" for i in range(8)))
    ref = _generate_here(d, prompts, tmp_path / "ref")

    # atomic writes: 1 spec.json, 2 chunk 0, 3 chunk 1 -> SIGKILL with chunk 1 written but not committed
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", NEMODIFF_FAULT="distill:3")
    killed = subprocess.run([sys.executable, "-c", _GENERATE, str(d), str(prompts), str(tmp_path / "run")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    chunks = tmp_path / "run" / "chunks" / "src0"
    assert (chunks / "chunk_000000.json").is_file() and (chunks / ".chunk_000001.json.tmp").is_file()
    assert not (chunks / "chunk_000001.json").exists() and not (tmp_path / "run" / "meta.json").exists()

    resumed = _generate_here(d, prompts, tmp_path / "run")
    rows = resumed.files[0].read_text()
    assert rows == ref.files[0].read_text()
    for m in (resumed.meta, ref.meta):
        m["sources"][0].pop("seconds")
    assert resumed.meta == ref.meta
    kept, cut = ref.meta["sources"][0]["kept"], ref.meta["sources"][0]["cut_by_max_new_tokens"]
    assert kept + cut == 8 and kept > 0 and len(rows.splitlines()) == kept
