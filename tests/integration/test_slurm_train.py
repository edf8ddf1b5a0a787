"""The real trainer through ``sbatch slurm/pretrain_tiny.sh`` on a real local Slurm (2 torchrun workers).

One job chain: job 1 trains, checkpoints and exports; job 2 (afterany) resumes from job 1's last
step; job 3 gets ``scancel --signal=TERM`` mid-run, saves a checkpoint and ends; job 4 resumes
from that checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

try:
    from . import slurm_cluster as sc
    from .slurm_cluster import slurm  # noqa: F401  (fixture)
except ImportError:
    import slurm_cluster as sc
    from slurm_cluster import slurm  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "pretrain_tiny.sh"


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in _metrics(run_dir) if "loss" in r]


def _submit(run_dir: Path, tmp_path: Path, *overrides: str, dependency: str | None = None) -> str:
    args = [f"--output={tmp_path}/%j.out", f"--chdir={REPO}"]
    if dependency:
        args.append(f"--dependency=afterany:{dependency}")
    return sc.sbatch(SCRIPT, *overrides, env={"RUN_DIR": str(run_dir), "OMP_NUM_THREADS": "1",
                                              "NEMODIFF_SLURM_DIR": str(REPO / "slurm")},
                     sbatch_args=args, cwd=tmp_path)


def _log(tmp_path: Path, job: str) -> str:
    return sc.job_output(tmp_path / f"{job}.out")


def test_train_chain_resume_and_preemption(slurm, tmp_path):
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    job1 = _submit(run_dir, tmp_path, "stages.0.steps=4")
    job2 = _submit(run_dir, tmp_path, "stages.0.steps=6", dependency=job1)
    state1 = sc.wait_job(job1, timeout=600)
    assert state1 == "COMPLETED", _log(tmp_path, job1)
    assert (run_dir / "checkpoints" / "step_00000004" / "COMPLETE").exists()
    assert (run_dir / "hf" / "config.json").exists(), "job 1 did not export"
    assert _steps(run_dir) == [1, 2, 3, 4]

    state2 = sc.wait_job(job2, timeout=600)
    assert state2 == "COMPLETED", _log(tmp_path, job2)
    assert "resuming from" in _log(tmp_path, job2) and "step 4" in _log(tmp_path, job2)
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6]  # continued, not restarted
    assert (run_dir / "checkpoints" / "step_00000006" / "COMPLETE").exists()

    # job 3: a long run, TERM'd once it has trained a step
    job3 = _submit(run_dir, tmp_path, "stages.0.steps=500", "checkpoint.every=1000", "logging.val_every=0")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and max(_steps(run_dir)) <= 6:
        assert sc.job_state(job3) not in sc.TERMINAL_STATES, _log(tmp_path, job3)
        time.sleep(0.2)
    sc.scancel_signal(job3, "TERM")
    state3 = sc.wait_job(job3, timeout=300)
    log3 = _log(tmp_path, job3)
    assert state3 == "COMPLETED", log3  # the trainer saved and exited 0, and so did the launcher
    preempted = [r for r in _metrics(run_dir) if r.get("event") == "preempted"]
    assert preempted, log3
    stopped_at = preempted[-1]["step"]
    assert 6 < stopped_at < 500
    assert (run_dir / "checkpoints" / f"step_{stopped_at:08d}" / "COMPLETE").exists()

    job4 = _submit(run_dir, tmp_path, f"stages.0.steps={stopped_at + 2}", "checkpoint.every=1000",
                   "logging.val_every=0")
    assert sc.wait_job(job4, timeout=600) == "COMPLETED", _log(tmp_path, job4)
    assert f"step {stopped_at})" in _log(tmp_path, job4)
    assert _steps(run_dir)[-2:] == [stopped_at + 1, stopped_at + 2]
    print(f"slurm chain test: {time.monotonic() - t0:.0f} s")
