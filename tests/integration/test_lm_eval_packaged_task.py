"""The packaged lm-eval task ``nemodiff_code_completion``, offline, through the real lm-eval and the
``nemodiff-lm-eval`` wrapper (which registers the task directory itself), checked against
``nemodiff-eval`` on the same model and rows: the same generations, the same per-sample metrics."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from nemodiff_train.assets import embedded_model_dir  # noqa: E402
from nemodiff_train.tasks import scoring  # noqa: E402
from nemodiff_train.cli.lm_eval import TASKS_DIR, with_packaged_tasks  # noqa: E402

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LIMIT, MAX_NEW = 3, 12
UNTIL = ["\ndef ", "\nclass "]  # the task's stop strings (nemodiff_code_completion.yaml)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert res.returncode == 0, f"{args} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res


def _cut(text: str) -> str:
    cut = min([text.find(u) for u in UNTIL if u in text] or [len(text)])
    return text[:cut]


def test_include_path_is_added_once():
    assert with_packaged_tasks(["--tasks", "x"]) == ["--tasks", "x", "--include_path", str(TASKS_DIR)]
    assert with_packaged_tasks(["--include_path", "mine"]) == ["--include_path", "mine"]
    assert with_packaged_tasks(["--include_path=mine"]) == ["--include_path=mine"]
    assert (TASKS_DIR / "nemodiff_code_completion.yaml").is_file()


def test_packaged_task_offline_matches_nemodiff_eval(tmp_path):
    model = embedded_model_dir()  # a real (tiny) AR model: its completions are code, not noise
    res = _run(["nemodiff_train.cli.lm_eval", "--model", "nemodiff",
                "--model_args", f"pretrained={model},mode=linear_spec", "--tasks", "nemodiff_code_completion",
                "--limit", str(LIMIT), "--gen_kwargs", f"max_gen_toks={MAX_NEW}", "--device", "cpu",
                "--output_path", str(tmp_path / "lm_out"), "--log_samples"], cwd=tmp_path)
    (results_file,) = glob.glob(str(tmp_path / "lm_out" / "**" / "results_*.json"), recursive=True)
    results = json.loads(Path(results_file).read_text())["results"]["nemodiff_code_completion"]
    (samples_file,) = glob.glob(str(tmp_path / "lm_out" / "**" / "samples_nemodiff_code_completion_*.jsonl"),
                                recursive=True)
    lm_samples = sorted((json.loads(x) for x in Path(samples_file).read_text().splitlines()), key=lambda s: s["doc_id"])
    assert len(lm_samples) == LIMIT and "nemodiff linear_spec: 3 generate requests" in res.stderr

    _run(["nemodiff_train.cli.evaluate", f"model={model}", "modes=[linear_spec]", f"limit={LIMIT}",
          f"max_new_tokens={MAX_NEW}", "chat_template=false", "sweep.threshold=[]", f"out={tmp_path / 'ev'}"], cwd=tmp_path)
    ours = [json.loads(x) for x in (tmp_path / "ev" / "samples.jsonl").read_text().splitlines()]
    ours = sorted((s for s in ours if s["mode"] == "linear_spec"), key=lambda s: s["index"])

    assert any(s["output_text"].strip() for s in ours)  # the comparison below compares real text
    for lm, ev in zip(lm_samples, ours):
        assert lm["resps"][0][0] == _cut(ev["output_text"])
        text, doc = lm["resps"][0][0], lm["doc"]
        first = scoring.first_nonempty_line
        assert lm["first_line_exact"] == float(first(text) == first(doc["reference"]))
        assert lm["ast_valid"] == scoring.ast_valid(doc["prompt"], text)
    for metric in ("first_line_exact", "ast_valid"):
        assert results[f"{metric},none"] == pytest.approx(sum(s[metric] for s in lm_samples) / LIMIT)
