"""What makes a checkpoint directory trustworthy: its trainer state, manifest and model identity.

:func:`verify_checkpoint` is the one verdict (resume, pruning and export's "latest" all ask it);
:func:`trainer_state_problem` is the one check of ``trainer_state.json``, shared by verifying and by
:func:`read_trainer_state`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ....runs import COMPLETE, DCP_METADATA, MANIFEST, TRAINER_STATE, step_of
from ....runs.dcp import CheckpointError, SafeFileSystemReader
from ...ranks import world_size

__all__ = ["FORMAT_VERSION", "CHECKSUM_LIMIT", "model_identity", "read_trainer_state", "trainer_state_problem",
           "verify_checkpoint", "build_manifest", "read_json"]

FORMAT_VERSION = 2
CHECKSUM_LIMIT = 256 << 20  # bigger shards are checked by size only: hashing 100 GB per save is too slow


def read_json(path: Path) -> tuple[Any, str | None]:
    """``(object, None)``, or ``(None, why)`` when ``path`` is missing or not JSON."""
    if not path.is_file():
        return None, f"{path} is missing"
    try:
        return json.loads(path.read_text()), None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{path} is unreadable ({type(e).__name__}: {e})"


def trainer_state_problem(ckpt: Path) -> tuple[dict | None, str | None]:
    """``(trainer_state, None)``, or ``(None, why)`` when ``ckpt`` has no complete, well-formed trainer state."""
    if not (ckpt / COMPLETE).is_file():
        return None, f"no {COMPLETE} marker in {ckpt} (an interrupted save)"
    state, why = read_json(ckpt / TRAINER_STATE)
    if why:
        return None, why
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("tokens"), int):
        return None, f"{ckpt / TRAINER_STATE} is not a trainer state (needs integer 'step' and 'tokens')"
    return state, None


def read_trainer_state(ckpt: Path) -> dict:
    """``trainer_state.json`` of a complete checkpoint; :class:`CheckpointError` naming the problem otherwise."""
    state, why = trainer_state_problem(Path(ckpt))
    if why:
        raise CheckpointError(why)
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


# ------------------------------------------------------------------------------------------ manifest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(tmp: Path, step: int, model: dict | None) -> dict:
    """The manifest of the files written so far under ``tmp`` (sizes; SHA-256 up to :data:`CHECKSUM_LIMIT`)."""
    files = {}
    for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
        rel = file.relative_to(tmp).as_posix()
        size = file.stat().st_size
        files[rel] = {"size": size, **({"sha256": _sha256(file)} if size <= CHECKSUM_LIMIT else {})}
    return {"format_version": FORMAT_VERSION, "step": step, "world_size": world_size(), "files": files,
            "model": model}


def _manifest_problem(ckpt: Path, manifest: dict, deep: bool, model: dict | None) -> str | None:
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
        return _identity_mismatch(manifest["model"], model)
    return None


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
    state, why = trainer_state_problem(ckpt)
    if why:
        return why
    named = step_of(ckpt)
    if named is not None and named != state["step"]:
        return f"{ckpt / TRAINER_STATE} says step {state['step']} but the directory is step {named}"
    if not (ckpt / DCP_METADATA).is_file():
        return f"{ckpt / DCP_METADATA} is missing"
    manifest, why = read_json(ckpt / MANIFEST)
    if manifest is None and not (ckpt / MANIFEST).exists():
        manifest = None  # written before manifests existed: DCP's own checks at load time only
    elif why or not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return why or f"{ckpt / MANIFEST} is not a checkpoint manifest"
    if manifest is not None:
        why = _manifest_problem(ckpt, manifest, deep, model)
        if why:
            return why
    if deep:
        try:
            SafeFileSystemReader(str(ckpt)).read_metadata()
        except Exception as e:
            return f"{ckpt / DCP_METADATA} is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None
