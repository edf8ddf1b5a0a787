"""Resumable checkpoints with ``torch.distributed.checkpoint`` (DCP): atomic, verified, never silently lost.

Layout of ``<run>/checkpoints/step_00000123/`` (the names are :mod:`nemodiff_train.runs`'s):

* the DCP shards (``__<rank>_<n>.distcp``) and ``.metadata`` of ``{"model", "optim"}``;
* ``rng/rank_<r>.json``: each rank's RNG streams (torch CPU and CUDA, Python ``random``, NumPy);
* ``trainer_state.json``: step, stage, tokens, world size (plain JSON, never pickled);
* ``manifest.json``: every file above with its size (and SHA-256 when under
  :data:`CHECKSUM_LIMIT` bytes), the world size, and the model's identity (every state-dict key with
  its global shape and dtype);
* ``COMPLETE``, written last.

Saving: a collective free-space check first (a clear error naming the directory and the bytes
needed, before anything is written), then everything goes to ``step_….tmp`` and is fsynced; the
directory is renamed into place only when complete, and only then are older checkpoints pruned to
``keep_last`` (counting and deleting only checkpoints that verify: one this code could not read is
never deleted). A failed save (full disk, I/O error) removes its ``.tmp`` and leaves every earlier
checkpoint untouched.

Resuming (:func:`select_resume`) takes the newest checkpoint that verifies against this model —
``COMPLETE`` present, ``trainer_state.json`` readable and consistent, every manifest file present
with its size and checksum, the same model — and names every newer one it skipped and why. A run
directory whose checkpoints all fail is an error naming them, never a fresh start. A different
world size is allowed: DCP reshards the model and optimizer, and the data order does not depend on
the world size (``batches.py``); each rank's RNG streams are restored when the world size matches,
otherwise ranks without a saved stream keep the seed's.

Loading unpickles nothing untrusted (:func:`nemodiff_train.runs.dcp.load_dcp`): DCP's ``.metadata``
pickle is read with an unpickler admitting DCP's metadata classes only, byte entries (optimizer
settings) with ``torch.load(weights_only=True)``, and tensors with ``weights_only`` semantics by DCP.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from ...faults import fault_point
from ...runs import (CHECKPOINTS_DIR, COMPLETE, DCP_METADATA, MANIFEST, RNG_DIR, TRAINER_STATE, checkpoint_dir,
                     list_checkpoints, step_dirs, step_of)
from ...runs.dcp import CheckpointError, SafeFileSystemReader, load_dcp

log = logging.getLogger(__name__)

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "load_model_weights", "read_trainer_state", "verify_checkpoint", "select_resume",
           "resume_checkpoint", "model_identity", "restore_rng", "SafeFileSystemReader"]

FORMAT_VERSION = 2
CHECKSUM_LIMIT = 256 << 20  # bigger shards are checked by size only: hashing 100 GB per save is too slow
SPACE_MARGIN = 1.05  # DCP metadata, JSON files and file-system rounding on top of the tensor bytes


def _latest_verified(run_dir: Path) -> Path | None:
    """The newest checkpoint whose files verify by size, or ``None``."""
    return next((c for c in reversed(list_checkpoints(run_dir)) if verify_checkpoint(c, deep=False) is None), None)


def read_trainer_state(ckpt: Path) -> dict:
    ckpt = Path(ckpt)
    if not (ckpt / COMPLETE).is_file():
        raise CheckpointError(f"{ckpt}: incomplete checkpoint (no {COMPLETE} marker)")
    try:
        state = json.loads((ckpt / TRAINER_STATE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / TRAINER_STATE}: unreadable trainer state ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("tokens"), int):
        raise CheckpointError(f"{ckpt / TRAINER_STATE}: not a trainer state (needs integer 'step' and 'tokens')")
    return state


# ------------------------------------------------------------------------------------------ identity


def model_identity(model_state: dict[str, Any]) -> dict[str, list]:
    """``{key: [global shape..., dtype]}`` of a model state dict (DTensors report their global shape)."""
    return {k: [*map(int, v.shape), str(v.dtype).removeprefix("torch.")]
            for k, v in sorted(model_state.items()) if isinstance(v, torch.Tensor)}


def _identity_mismatch(saved: dict, current: dict) -> str | None:
    if saved == current:
        return None
    missing, extra = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    if missing or extra:
        return (f"saved from another model: {len(extra)} tensor(s) this model lacks (e.g. {extra[:2]}), "
                f"{len(missing)} it does not have (e.g. {missing[:2]})")
    key = next(k for k in current if saved[k] != current[k])
    return f"saved from another model: {key!r} is {saved[key]} there but {current[key]} here"


# ----------------------------------------------------------------------------------------- safe reading
# (reading DCP's .metadata pickle safely: nemodiff_train/runs/dcp.py)


# -------------------------------------------------------------------------------------------- verify


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path) -> tuple[Any, str | None]:
    if not path.is_file():
        return None, f"{path} is missing"
    try:
        return json.loads(path.read_text()), None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{path} is unreadable ({type(e).__name__}: {e})"


def verify_checkpoint(ckpt: Path, *, deep: bool = True, model: dict | None = None) -> str | None:
    """Why ``ckpt`` cannot be resumed from, or ``None`` when it verifies.

    Args:
        deep: also compare checksums and parse DCP's ``.metadata`` (resume); ``False`` checks only
            markers, JSON files and sizes (pruning, export's "latest").
        model: this model's :func:`model_identity`; a checkpoint of another model is refused.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return f"{ckpt} is not a directory"
    if not (ckpt / COMPLETE).is_file():
        return f"no {COMPLETE} marker in {ckpt} (an interrupted save)"
    state, why = _read_json(ckpt / TRAINER_STATE)
    if why:
        return why
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("tokens"), int):
        return f"{ckpt / TRAINER_STATE} is not a trainer state (needs integer 'step' and 'tokens')"
    named = step_of(ckpt)
    if named is not None and named != state["step"]:
        return f"{ckpt / TRAINER_STATE} says step {state['step']} but the directory is step {named}"
    if not (ckpt / DCP_METADATA).is_file():
        return f"{ckpt / DCP_METADATA} is missing"
    manifest, why = _read_json(ckpt / MANIFEST)
    if manifest is None and not (ckpt / MANIFEST).exists():
        manifest = None  # written before manifests existed: DCP's own checks at load time only
    elif why or not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return why or f"{ckpt / MANIFEST} is not a checkpoint manifest"
    if manifest is not None:
        for rel, info in manifest["files"].items():
            file = ckpt / rel
            if not file.is_file():
                return f"{file} is missing (listed in {MANIFEST})"
            size = file.stat().st_size
            if size != info.get("size"):
                return f"{file} is {size} bytes, {MANIFEST} says {info.get('size')} (truncated or overwritten)"
            if deep and info.get("sha256") and _sha256(file) != info["sha256"]:
                return f"{file} does not match its SHA-256 in {MANIFEST} (corrupt)"
        if model is not None and manifest.get("model") is not None:
            why = _identity_mismatch(manifest["model"], model)
            if why:
                return why
    if deep:
        try:
            SafeFileSystemReader(str(ckpt)).read_metadata()
        except Exception as e:
            return f"{ckpt / DCP_METADATA} is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def select_resume(run_dir: Path, model: dict | None = None) -> tuple[Path | None, list[str]]:
    """The newest checkpoint of ``run_dir`` that verifies, and notes on everything skipped.

    Returns ``(None, notes)`` when the run has no checkpoint at all. Unfinished saves (``*.tmp``)
    are removed (they are never checkpoints: ``COMPLETE`` is written before the rename).

    Raises:
        CheckpointError: the run has checkpoints but none verifies (each is named with its reason).
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return None, []
    notes, failed = [], []
    steps = step_dirs(run_dir)
    for p in sorted(root.iterdir()):
        if p in steps:
            continue
        if p.name.endswith(".tmp") and step_of(p.name[:-4]) is not None and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            notes.append(f"removed {p}: an unfinished save (no checkpoint is lost: it was never complete)")
        else:
            notes.append(f"ignoring {p}: not a checkpoint directory (expected step_NNNNNNNN)")
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
    if _rank() == 0:
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


# ---------------------------------------------------------------------------------------------- RNG


def _rng_state() -> dict:
    np_state = np.random.get_state()
    version, mt, gauss = random.getstate()
    state = {"torch": torch.get_rng_state().numpy().tobytes().hex(),
             "python": [version, list(mt), gauss],
             "numpy": [np_state[0], np_state[1].tolist(), *map(lambda x: x.item() if hasattr(x, "item") else x,
                                                                 np_state[2:])]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.numpy().tobytes().hex() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray.fromhex(state["torch"]), dtype=torch.uint8).clone())
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray.fromhex(s), dtype=torch.uint8).clone()
                                      for s in state["cuda"]])


def _rng_file(ckpt: Path, rank: int) -> Path:
    return Path(ckpt) / RNG_DIR / f"rank_{rank:05d}.json"


def restore_rng(ckpt: Path, rank: int, world_size: int) -> str | None:
    """Restore this rank's RNG streams from ``ckpt``; returns a note when they could not be."""
    saved_world = read_trainer_state(ckpt).get("world_size")
    file = _rng_file(ckpt, rank)
    if not file.is_file():
        return (f"{ckpt}: no RNG state for rank {rank} (saved with world size {saved_world}, now {world_size}); "
                "this rank keeps the RNG streams of run.seed")
    state, why = _read_json(file)
    if why:
        raise CheckpointError(why)
    _set_rng_state(state)
    if saved_world is not None and saved_world != world_size:
        return f"{ckpt}: world size {saved_world} -> {world_size}: rank {rank} took rank {rank}'s RNG streams"
    return None


# --------------------------------------------------------------------------------------------- save


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


@contextlib.contextmanager
def _quiet_single_process():
    """Without a process group DCP warns that it assumes one process, which is exactly the case here
    (a plain ``nemodiff-train`` run); the warning would only look like a failure in the log."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather(obj):
    """Every rank's ``obj`` (a list of one element in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _manifest(tmp: Path, step: int, model: dict) -> dict:
    files = {}
    for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
        rel = file.relative_to(tmp).as_posix()
        size = file.stat().st_size
        files[rel] = {"size": size, **({"sha256": _sha256(file)} if size <= CHECKSUM_LIMIT else {})}
    return {"format_version": FORMAT_VERSION, "step": step, "world_size": _world(), "files": files, "model": model}


def _space_error(root: Path, step: int, need: int, free: int, cause: str) -> CheckpointError:
    kept = _latest_verified(root.parent)
    return CheckpointError(
        f"cannot save checkpoint step {step} in {root}: {cause}; it needs about {need:,} bytes and the file "
        f"system has {free:,} free. {'The previous checkpoint ' + str(kept) + ' is intact.' if kept else 'No earlier checkpoint exists.'}"
        " Free space (or point run.dir elsewhere) and rerun: training resumes from the last checkpoint.")


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], trainer_state: dict, keep_last: int) -> Path:
    """Save ``state`` (tensors / DCP-stateful dicts) and ``trainer_state`` (JSON) for ``step``; all ranks call.

    Returns the final checkpoint directory. Raises :class:`CheckpointError` (on every rank) when the
    disk is too full or a write fails; earlier checkpoints are then untouched.
    """
    final = checkpoint_dir(run_dir, step)
    root = final.parent
    tmp = final.with_name(final.name + ".tmp")
    need = int(sum(_gather(_tensor_bytes(state))) * SPACE_MARGIN)
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    free = shutil.disk_usage(root).free if _rank() == 0 else 0
    free = _gather(free)[0]
    if free < need:
        raise _space_error(root, step, need, free, "not enough free disk space (nothing was written)")
    model = model_identity(state["model"]) if "model" in state else None
    errors: list = []
    try:
        if _rank() == 0:
            tmp.mkdir()
        _barrier()
        with _quiet_single_process():
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True))
        rng = _rng_file(tmp, _rank())
        rng.parent.mkdir(exist_ok=True)
        _write_json(rng, _rng_state())
        fault_point("checkpoint")
    except Exception as e:  # DCP wraps OSErrors in CheckpointException; keep the first line
        errors.append(e)
    errors = [e for e in _gather(f"{type(errors[0]).__name__}: {errors[0]}" if errors else None) if e]
    if not errors and _rank() == 0:
        try:
            _write_json(tmp / TRAINER_STATE, {**trainer_state, "world_size": _world()})
            _write_json(tmp / MANIFEST, _manifest(tmp, step, model))
            (tmp / COMPLETE).write_text("")
            _fsync(tmp / COMPLETE)
            _fsync(tmp)
        except OSError as e:
            errors.append(f"{type(e).__name__}: {e}")
    errors = [e for e in _gather(errors[0] if errors else None) if e]
    if errors:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the previous checkpoint is untouched
        cause = errors[0].strip().splitlines()
        full = any("No space left" in e or f"Errno {errno.ENOSPC}" in e for e in errors)
        free = shutil.disk_usage(root).free if root.exists() else 0
        if full:
            raise _space_error(root, step, need, free, "the disk filled up while writing")
        raise CheckpointError(f"cannot save checkpoint {final}: {cause[-1] if cause else errors[0]}")
    if _rank() == 0:
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


# --------------------------------------------------------------------------------------------- load


def load_checkpoint(ckpt: Path, state: dict[str, Any]) -> dict:
    """Load DCP shards into ``state`` in place; returns the trainer state."""
    trainer_state = read_trainer_state(ckpt)
    try:
        with _quiet_single_process():
            load_dcp(state, ckpt)  # restricted .metadata, weights_only byte entries
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
        with _quiet_single_process():
            load_dcp({"model": state}, ckpt)
    except Exception as e:
        raise CheckpointError(f"{ckpt}: model weights do not fit this architecture: {e}") from None
    hf_model.load_state_dict(state)
