"""Saving a checkpoint atomically, then pruning old ones.

A collective free-space check first (a clear error naming the directory and the bytes needed,
before anything is written); then everything goes to ``step_….tmp`` and is fsynced; the directory
is renamed into place only when complete (``COMPLETE`` written last), and only then are older
checkpoints pruned to ``keep_last``, counting and deleting only checkpoints that verify. A failed
save (full disk, I/O error) removes its ``.tmp`` and leaves every earlier checkpoint untouched.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from ....faults import fault_point
from ....runs import COMPLETE, MANIFEST, TRAINER_STATE, checkpoint_dir, step_dirs
from ....runs.dcp import CheckpointError
from ...ranks import rank, world_size
from .manifest import build_manifest, model_identity, verify_checkpoint
from .resume import latest_verified, quiet_single_process
from .rng import save_rng, write_json

log = logging.getLogger(__name__)

__all__ = ["save_checkpoint", "SPACE_MARGIN"]

SPACE_MARGIN = 1.05  # DCP metadata, JSON files and file-system rounding on top of the tensor bytes


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather(obj) -> list:
    """Every rank's ``obj`` (a list of one element in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _first_errors(error) -> list[str]:
    """Every rank's error text (``None`` where a rank had none), without the ``None``s."""
    return [e for e in _gather(error) if e]


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors this rank holds in a (nested) state dict (a DTensor's local shard)."""
    if isinstance(obj, torch.Tensor):
        local = obj.to_local() if hasattr(obj, "to_local") else obj
        return local.numel() * local.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _space_error(root: Path, step: int, need: int, free: int, cause: str) -> CheckpointError:
    kept = latest_verified(root.parent)
    return CheckpointError(
        f"cannot save checkpoint step {step} in {root}: {cause}; it needs about {need:,} bytes and the file "
        f"system has {free:,} free. {'The previous checkpoint ' + str(kept) + ' is intact.' if kept else 'No earlier checkpoint exists.'}"
        " Free space (or point run.dir elsewhere) and rerun: training resumes from the last checkpoint.")


def _prepare(final: Path, tmp: Path, state: dict, step: int) -> int:
    """Make room for ``tmp`` and refuse (on every rank) when the disk cannot hold the save; returns
    the bytes needed."""
    root = final.parent
    need = int(sum(_gather(_tensor_bytes(state))) * SPACE_MARGIN)
    if rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    free = _gather(shutil.disk_usage(root).free if rank() == 0 else 0)[0]
    if free < need:
        raise _space_error(root, step, need, free, "not enough free disk space (nothing was written)")
    return need


def _write_shards(tmp: Path, state: dict) -> list[str]:
    """Every rank writes its DCP shards and RNG streams into ``tmp``; returns every rank's error."""
    error = None
    try:
        if rank() == 0:
            tmp.mkdir()
        _barrier()
        with quiet_single_process():
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True))
        save_rng(tmp, rank())
        fault_point("checkpoint")
    except Exception as e:  # DCP wraps OSErrors in CheckpointException; keep the first line
        error = f"{type(e).__name__}: {e}"
    return _first_errors(error)


def _write_records(tmp: Path, step: int, trainer_state: dict, model: dict | None) -> list[str]:
    """Rank 0 writes the trainer state, the manifest and ``COMPLETE`` (last); returns every rank's error."""
    error = None
    if rank() == 0:
        try:
            write_json(tmp / TRAINER_STATE, {**trainer_state, "world_size": world_size()})
            write_json(tmp / MANIFEST, build_manifest(tmp, step, model))
            (tmp / COMPLETE).write_text("")
            _fsync(tmp / COMPLETE)
            _fsync(tmp)
        except OSError as e:
            error = f"{type(e).__name__}: {e}"
    return _first_errors(error)


def _failed(final: Path, tmp: Path, step: int, need: int, errors: list[str]) -> CheckpointError:
    """Give the space back (the previous checkpoint is untouched) and say why the save failed."""
    root = final.parent
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    cause = errors[0].strip().splitlines()
    if any("No space left" in e or f"Errno {errno.ENOSPC}" in e for e in errors):
        free = shutil.disk_usage(root).free if root.exists() else 0
        return _space_error(root, step, need, free, "the disk filled up while writing")
    return CheckpointError(f"cannot save checkpoint {final}: {cause[-1] if cause else errors[0]}")


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], trainer_state: dict, keep_last: int) -> Path:
    """Save ``state`` (tensors / DCP-stateful dicts) and ``trainer_state`` (JSON) for ``step``; all ranks call.

    Returns the final checkpoint directory. Raises :class:`CheckpointError` (on every rank) when the
    disk is too full or a write fails; earlier checkpoints are then untouched.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    need = _prepare(final, tmp, state, step)
    model = model_identity(state["model"]) if "model" in state else None
    errors = _write_shards(tmp, state)
    if not errors:
        errors = _write_records(tmp, step, trainer_state, model)
    if errors:
        raise _failed(final, tmp, step, need, errors)
    if rank() == 0:
        _install(tmp, final)
        fault_point("prune")
        _prune(run_dir, keep_last, final)
    _barrier()
    return final


def _install(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (a re-save of that step) is replaced only
    after the new one is in place, and kept aside as ``….unreadable`` if it did not verify."""
    aside = None
    if final.exists():
        aside = final.with_name(final.name + ".replaced")
        if aside.exists():
            shutil.rmtree(aside)
        final.rename(aside)
    tmp.rename(final)
    _fsync(final.parent)
    if aside is not None:
        why = verify_checkpoint(aside, deep=False)
        if why is None:
            shutil.rmtree(aside, ignore_errors=True)
        else:
            kept = final.with_name(final.name + ".unreadable")
            if kept.exists():
                shutil.rmtree(kept)
            aside.rename(kept)
            log.warning("kept the unreadable checkpoint this save replaced as %s (%s)", kept, why)


def _prune(run_dir: Path, keep_last: int, newest: Path) -> None:
    """Delete verified checkpoints older than the ``keep_last`` newest verified ones (``newest`` counts)."""
    valid, bad = [], []
    for ckpt in step_dirs(run_dir):
        if ckpt.name > newest.name:
            continue  # from another history (a resume from an older checkpoint): not ours to prune
        (valid if verify_checkpoint(ckpt, deep=False) is None else bad).append(ckpt)
    for old in valid[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for ckpt in bad:
        log.warning("not pruning %s: it does not verify (%s); remove it by hand once inspected", ckpt,
                    verify_checkpoint(ckpt, deep=False))
