"""The first 10 training losses of ``tiny_cpu`` are pinned: numerics must never change unnoticed.
And ``model.dtype=bfloat16`` (bf16 compute, float32 master weights) tracks that fp32 curve.

How the numbers were produced (2026-11-30). First pinned at 7b8f318 with the previous embedded base,
before the issue-13 refactor of the torch engine into setup / parallelize / train; the merged
engine (issues 12-16) still reproduced those ten losses bit for bit with that base
(4.737391471862793, 3.8564388751983643, ... 5.322342872619629). The embedded base was then rebuilt
(code + arithmetic word problems, ``scripts/build_embedded_model.py``) three times; the numbers
below are the current base's (3,000 steps, the first half arithmetic only), from the same command on
the current code. The base before it (3,000 steps of the mix) gave 5.1599578857421875,
5.335731029510498, ... 4.743171215057373, and the one before that 5.298550605773926, ...
4.635058879852295::

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python -m nemodiff_train.cli.train recipe=tiny_cpu \\
        run.dir=<tmp> stages.0.steps=10 export.at_end=false engine.device=cpu \\
        logging.val_every=0 checkpoint.every=100

then ``loss`` of the ten training rows of ``<tmp>/metrics.jsonl`` (fp32, one process, run.seed=0,
the embedded model and data shipped in the package; torch 2.13.0+cpu, x86-64, 2-core CPU).

Tolerance: the refactored code reproduced them bit for bit on that machine. ``rel=1e-4`` leaves room
for another CPU's kernels (other SIMD widths sum in another order) compounding over ten AdamW steps
at lr 1e-3; anything that changes the method (noise seeding, data order, loss normalisation, LR
schedule, precision) moves these losses by 1e-2 or more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

GOLDEN = [  # step 1..10 `loss` (joint: (alpha·Σ CE/p + beta·Σ AR CE) / (N_mask + beta·N_AR))
    5.702538013458252, 5.848757266998291, 4.680643081665039, 4.4077911376953125, 5.080028057098389,
    5.940410614013672, 4.744265079498291, 6.090622425079346, 5.20352029800415, 4.954977035522461,
]
REL = 1e-4


# bf16 compute vs the fp32 curve: measured max relative gap 0.14 % (step 2) on the machine above;
# the bound leaves room for other CPUs while a broken precision path (bf16 master weights dropping
# updates, a wrong loss scale) is far outside it.
BF16_REL = 0.02


def _run(run_dir: Path, *extra: str) -> list[float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONPATH=str(REPO))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "nemodiff_train.cli.train", "recipe=tiny_cpu", f"run.dir={run_dir}",
           "stages.0.steps=10", "export.at_end=false", "engine.device=cpu", "logging.val_every=0",
           "checkpoint.every=100", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 10, rows
    return losses


def _saved_dtypes(ckpt: Path) -> dict[str, set[str]]:
    """{"model": {dtypes of its tensors}, "optim": {...}} from the DCP metadata of a checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(ckpt)).read_metadata()
    out: dict[str, set[str]] = {}
    for key, meta in md.state_dict_metadata.items():
        if hasattr(meta, "properties"):  # tensors (not bytes entries such as the optimizer's step count)
            out.setdefault(key.split(".")[0], set()).add(str(meta.properties.dtype))
    return out


def test_tiny_cpu_first_ten_losses(tmp_path):
    losses = _run(tmp_path / "run")
    for step, (got, want) in enumerate(zip(losses, GOLDEN), start=1):
        assert got == pytest.approx(want, rel=REL), f"step {step}: loss {got!r} != golden {want!r}; all: {losses}"


def test_bf16_compute_keeps_fp32_master_weights_and_tracks_fp32(tmp_path):
    """model.dtype=bfloat16: bf16 autocast, but parameters, optimizer state and the checkpoint are fp32
    (at 7b8f318 they were all bf16), and the loss curve stays within BF16_REL of the fp32 golden one."""
    run_dir = tmp_path / "bf16"
    losses = _run(run_dir, "model.dtype=bfloat16")
    dtypes = _saved_dtypes(run_dir / "checkpoints" / "step_00000010")
    assert dtypes["model"] == {"torch.float32"}, dtypes
    assert dtypes["optim"] == {"torch.float32"}, dtypes  # exp_avg, exp_avg_sq
    assert losses != GOLDEN  # the compute really ran in bf16
    for step, (got, want) in enumerate(zip(losses, GOLDEN), start=1):
        assert got == pytest.approx(want, rel=BF16_REL), f"step {step}: bf16 {got!r} vs fp32 {want!r}; {losses}"
