"""Each rank's RNG streams (torch CPU and CUDA, Python ``random``, NumPy) as plain JSON.

Noise and data order are seeded per sample (``batches.py``); these streams cover the rest (dropout
and anything else drawing from the global generators), so a resumed run continues them exactly.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from ....runs import RNG_DIR
from ....runs.dcp import CheckpointError
from .manifest import read_json, read_trainer_state

__all__ = ["save_rng", "restore_rng"]


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


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON and fsync it (a checkpoint's files are durable before ``COMPLETE``)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def save_rng(ckpt: Path, rank: int) -> None:
    """Write this rank's RNG streams into the (temporary) checkpoint directory ``ckpt``."""
    file = _rng_file(ckpt, rank)
    file.parent.mkdir(exist_ok=True)
    write_json(file, _rng_state())


def restore_rng(ckpt: Path, rank: int, world_size: int) -> str | None:
    """Restore this rank's RNG streams from ``ckpt``; returns a note when they could not be."""
    saved_world = read_trainer_state(ckpt).get("world_size")
    file = _rng_file(ckpt, rank)
    if not file.is_file():
        return (f"{ckpt}: no RNG state for rank {rank} (saved with world size {saved_world}, now {world_size}); "
                "this rank keeps the RNG streams of run.seed")
    state, why = read_json(file)
    if why:
        raise CheckpointError(why)
    _set_rng_state(state)
    if saved_world is not None and saved_world != world_size:
        return f"{ckpt}: world size {saved_world} -> {world_size}: rank {rank} took rank {rank}'s RNG streams"
    return None
