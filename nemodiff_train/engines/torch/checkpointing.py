"""Resumable checkpoints with ``torch.distributed.checkpoint`` (DCP), written atomically.

Layout: ``<run>/checkpoints/step_00000123/`` holds the DCP shards of ``{"model", "optim", "rng"}``,
``trainer_state.json`` (step, stage, data position, tokens: plain JSON, never pickled) and a
``COMPLETE`` marker written last. A checkpoint is built in ``step_…​.tmp`` and renamed only when
complete, so a crash mid-save never leaves a directory that looks complete; directories without the
marker are ignored (and cleaned up) when resuming. DCP stores tensors, so loading unpickles nothing
untrusted (``weights_only`` semantics); the model entry holds the HF-layout state dict, so export can
load it into a freshly built HF model.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

__all__ = ["CheckpointError", "checkpoint_dir", "latest_checkpoint", "list_checkpoints", "save_checkpoint",
           "load_checkpoint", "load_model_weights", "read_trainer_state"]

_STEP_DIR = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def read_trainer_state(ckpt: Path) -> dict:
    ckpt = Path(ckpt)
    if not (ckpt / COMPLETE).is_file():
        raise CheckpointError(f"{ckpt}: incomplete checkpoint (no {COMPLETE} marker)")
    try:
        return json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / STATE_FILE}: unreadable trainer state ({e})") from None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _quiet_single_process():
    """Without a process group DCP warns that it assumes one process, which is exactly the case here
    (a plain ``nemodiff-train`` run); the warning would only look like a failure in the log."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
        yield


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], trainer_state: dict, keep_last: int) -> Path:
    """Save ``state`` (tensors / DCP-stateful dicts) and ``trainer_state`` (JSON) for ``step``; all ranks call.

    Returns the final checkpoint directory.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=str(tmp))
    _barrier()
    if _rank() == 0:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
        (tmp / COMPLETE).write_text("")
        if final.exists():  # a re-save of the same step (e.g. signal right after a periodic save)
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(ckpt: Path, state: dict[str, Any]) -> dict:
    """Load DCP shards into ``state`` in place; returns the trainer state."""
    trainer_state = read_trainer_state(ckpt)
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(ckpt))
    except Exception as e:  # DCP raises several types (CheckpointException, RuntimeError, KeyError)
        raise CheckpointError(f"{ckpt}: cannot load checkpoint into this model/optimizer: {e}") from None
    return trainer_state


def load_model_weights(ckpt: Path, hf_model: torch.nn.Module) -> None:
    """Load only the model entry of a checkpoint into a (single-process) HF model."""
    read_trainer_state(ckpt)
    state = hf_model.state_dict()  # DCP loads in place into these tensors
    try:
        with _quiet_single_process():
            dcp.load({"model": state}, checkpoint_id=str(ckpt))
    except Exception as e:
        raise CheckpointError(f"{ckpt}: model weights do not fit this architecture: {e}") from None
    hf_model.load_state_dict(state)
