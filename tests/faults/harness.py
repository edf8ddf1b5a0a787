"""Run the real ``nemodiff-train`` CLI with injected faults (``NEMODIFF_FAULT``) and read what it left.

Every launch records how many ``metrics.jsonl`` lines existed before it, so a test can take the
rows *that launch* wrote (:attr:`Launch.rows`) and prove the steps it compares were re-run after a
fault rather than logged before it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# the tiny_cpu recipe (6 steps, checkpoints every 2, validation every 3) on the test model and data
from tests.helpers.tiny_run import make_run_assets as make_assets  # noqa: F401  (used by the tests)
from tests.helpers.tiny_run import tiny_cpu_args as base_args  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {"HF_TOKEN": "hf_faultsuiteSECRETdo_not_leak_4242", "WANDB_API_KEY": "wandbSECRETfaultsuite0123456789abcdef"}


def env(fault: str | None = None) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT),
             **SECRETS)
    e.pop("NEMODIFF_FAULT", None)
    if fault:
        e["NEMODIFF_FAULT"] = fault
    return e


def metrics(run_dir: Path) -> list[dict]:
    f = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []


def train_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "loss" in r]


@dataclass
class Launch:
    returncode: int
    output: str
    rows: list[dict] = field(default_factory=list)  # metrics rows this launch appended

    @property
    def steps(self) -> list[int]:
        return [r["step"] for r in train_rows(self.rows)]


def launch(args: list[str], run_dir: Path, *, fault: str | None = None, nproc: int = 0, timeout: int = 900) -> Launch:
    """Run the CLI once (``nproc`` > 0: under torchrun); never raises on a non-zero exit."""
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",
               "--max-restarts=0", "-m", "nemodiff_train.cli.train", *args]
    else:
        cmd = [sys.executable, "-m", "nemodiff_train.cli.train", *args]
    before = len(metrics(run_dir))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env(fault), timeout=timeout, cwd=str(ROOT))
    output = out.stdout + out.stderr
    for name, value in SECRETS.items():
        assert value not in output, f"{name} was printed by {cmd}"
    return Launch(out.returncode, output, metrics(run_dir)[before:])


def check_ok(result: Launch) -> Launch:
    assert result.returncode == 0, result.output[-4000:]
    return result


def reference(run_dir: Path) -> dict[int, dict]:
    """step -> the training row of an uninterrupted run."""
    rows = train_rows(metrics(run_dir))
    assert len({r["step"] for r in rows}) == len(rows), "the reference run logged a step twice"
    return {r["step"]: r for r in rows}


def assert_rows_identical(rows: list[dict], ref: dict[int, dict], *, exact: bool = True) -> int:
    """Every training row equals the reference row of its step (bit for bit when ``exact``); returns how many."""
    import math

    n = 0
    for r in train_rows(rows):
        want = ref[r["step"]]
        assert r["lr"] == want["lr"], (r["step"], r["lr"], want["lr"])
        assert r["masked_tokens"] == want["masked_tokens"], r["step"]  # same noise draws
        assert r["tokens"] == want["tokens"], r["step"]
        for key in ("loss", "ar_loss", "diffusion_loss", "grad_norm"):
            if exact:
                assert r[key] == want[key], (r["step"], key, r[key], want[key])
            else:
                assert math.isclose(r[key], want[key], rel_tol=2e-5, abs_tol=1e-6), (r["step"], key, r[key], want[key])
        n += 1
    return n


def resumed_from(result: Launch) -> int | None:
    import re

    m = re.search(r"resuming from \S+step_(\d{8})", result.output)
    return int(m.group(1)) if m else None
