"""Finding the checkpoint to resume from, and loading it.

:func:`select_resume` takes the newest checkpoint that verifies against this model and names every
newer one it skipped and why; a run whose checkpoints all fail is an error, never a fresh start.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from ....runs import CHECKPOINTS_DIR, list_checkpoints, step_dirs, step_of
from ....runs.dcp import CheckpointError, SafeFileSystemReader
from ...ranks import rank
from .manifest import read_trainer_state, verify_checkpoint

__all__ = ["select_resume", "resume_checkpoint", "load_checkpoint", "load_model_weights", "latest_verified",
           "quiet_single_process"]


def latest_verified(run_dir: Path) -> Path | None:
    """The newest checkpoint whose files verify by size, or ``None``."""
    return next((c for c in reversed(list_checkpoints(run_dir)) if verify_checkpoint(c, deep=False) is None), None)


@contextlib.contextmanager
def quiet_single_process():
    """Without a process group DCP warns that it assumes one process, which is exactly the case here
    (a plain ``nemodiff-train`` run); the warning would only look like a failure in the log."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
        yield


def _sweep_strays(root: Path, steps: list[Path]) -> list[str]:
    """Remove unfinished saves (``*.tmp``: never checkpoints, ``COMPLETE`` is written before the
    rename) and name everything else that is not a checkpoint directory."""
    notes = []
    for p in sorted(root.iterdir()):
        if p in steps:
            continue
        if p.name.endswith(".tmp") and step_of(p.name[:-4]) is not None and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            notes.append(f"removed {p}: an unfinished save (no checkpoint is lost: it was never complete)")
        else:
            notes.append(f"ignoring {p}: not a checkpoint directory (expected step_NNNNNNNN)")
    return notes


def select_resume(run_dir: Path, model: dict | None = None) -> tuple[Path | None, list[str]]:
    """The newest checkpoint of ``run_dir`` that verifies, and notes on everything skipped.

    Returns ``(None, notes)`` when the run has no checkpoint at all. Unfinished saves (``*.tmp``)
    are removed.

    Raises:
        CheckpointError: the run has checkpoints but none verifies (each is named with its reason).
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return None, []
    steps = step_dirs(run_dir)
    notes, failed = _sweep_strays(root, steps), []
    for ckpt in reversed(steps):
        why = verify_checkpoint(ckpt, deep=True, model=model)
        if why is None:
            return ckpt, notes
        failed.append((ckpt, why))
        notes.append(f"skipping checkpoint {ckpt}: {why}")
    if failed:
        listing = "\n  ".join(f"{c.name}: {why}" for c, why in failed)
        raise CheckpointError(
            f"{root} holds {len(failed)} checkpoint(s) and none can be resumed from; refusing to start over from "
            f"step 0 in an existing run (nothing was deleted). Repair or move them, or use a new run.dir:\n  {listing}")
    return None, notes


def resume_checkpoint(run_dir: Path, model: dict | None) -> tuple[Path | None, list[str]]:
    """:func:`select_resume` on rank 0, agreed by every rank (all raise the same error)."""
    result: tuple = (None, [], None)
    if rank() == 0:
        try:
            ckpt, notes = select_resume(run_dir, model)
            result = (str(ckpt) if ckpt else None, notes, None)
        except CheckpointError as e:
            result = (None, [], str(e))
    if dist.is_initialized():
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    path, notes, error = result
    if error:
        raise CheckpointError(error)
    return (Path(path) if path else None), notes


def load_checkpoint(ckpt: Path, state: dict[str, Any]) -> dict:
    """Load DCP shards into ``state`` in place; returns the trainer state."""
    trainer_state = read_trainer_state(ckpt)
    try:
        with quiet_single_process():
            dcp.load(state, storage_reader=SafeFileSystemReader(str(ckpt)))
    except Exception as e:  # DCP raises several types (CheckpointException, RuntimeError, KeyError)
        lines = str(e).strip().splitlines()
        raise CheckpointError(f"{ckpt}: cannot load checkpoint into this model/optimizer: "
                              f"{type(e).__name__}: {lines[-1] if lines else ''}") from None
    return trainer_state


def load_model_weights(ckpt: Path, hf_model: torch.nn.Module) -> None:
    """Load only the model entry of a checkpoint into a (single-process) HF model."""
    read_trainer_state(ckpt)
    state = hf_model.state_dict()  # DCP loads in place into these tensors
    try:
        with quiet_single_process():
            dcp.load({"model": state}, storage_reader=SafeFileSystemReader(str(ckpt)))
    except Exception as e:
        raise CheckpointError(f"{ckpt}: model weights do not fit this architecture: {e}") from None
    hf_model.load_state_dict(state)
