"""Reading a torch-engine checkpoint's DCP files without running untrusted code.

Two places of a DCP checkpoint are pickles, and both are read here without trusting their author:

* ``.metadata`` (the index): :class:`SafeFileSystemReader` reads it with the restricted unpickler of
  :mod:`.safe_pickle` (exact DCP metadata classes only) and checks what it got: a ``Metadata`` whose
  storage entries point at files inside the checkpoint directory;
* byte entries (non-tensor values such as optimizer settings, which DCP's default planner reads with
  ``torch.load(weights_only=False)``): :class:`SafeLoadPlanner` reads them with ``weights_only=True``
  and refuses any under ``model.`` (a model holds tensors only).

Tensors are read by DCP itself with ``weights_only=True``. :func:`load_dcp` is the one way this
package loads a DCP checkpoint (resume, export, the adapter export): reader and planner together.
"""

from __future__ import annotations

import pickle
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import default_planner as _default_planner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from . import DCP_METADATA
from .safe_pickle import UnsafeCheckpointError, load_dcp_metadata_pickle

__all__ = ["CheckpointError", "UnsafeCheckpointError", "SafeFileSystemReader", "SafeLoadPlanner", "load_dcp"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, does not fit the model, or cannot be written."""


def _check_storage_paths(metadata: Metadata, path) -> None:
    """Every storage entry names a file inside the checkpoint directory (no absolute path, no ``..``)."""
    for index, info in (metadata.storage_data or {}).items():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not rel:
            raise CheckpointError(f"{path}: storage entry {getattr(index, 'fqn', index)!r} names no file")
        for pure in (PurePosixPath(rel), PureWindowsPath(rel)):
            if pure.is_absolute() or pure.anchor or ".." in pure.parts:
                raise UnsafeCheckpointError(f"{path}: refusing storage entry {index.fqn!r}: its file {rel!r} lies "
                                            "outside the checkpoint directory")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader whose ``.metadata`` pickle may only build DCP metadata classes."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = load_dcp_metadata_pickle(f.read(), str(path))
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not DCP metadata (a {type(metadata).__name__})")
        if not isinstance(metadata.state_dict_metadata, dict) or not isinstance(metadata.storage_data, dict):
            raise CheckpointError(f"{path}: DCP metadata without its state-dict and storage tables")
        _check_storage_paths(metadata, path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(_default_planner.DefaultLoadPlanner):
    """DCP's default load planner, except that byte entries load with ``torch.load(weights_only=True)``
    and none may sit under ``model.`` (a model's entries are tensors)."""

    def load_bytes(self, read_item, value) -> None:
        fqn = read_item.dest_index.fqn
        if fqn == "model" or fqn.startswith("model."):
            raise UnsafeCheckpointError(f"refusing checkpoint entry {fqn!r}: a pickled object where the model "
                                        "holds tensors only")
        try:
            obj = torch.load(value, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise UnsafeCheckpointError(f"refusing checkpoint entry {fqn!r}: torch.load(weights_only=True) "
                                        f"rejects it ({first})") from None
        if self.flatten_state_dict:  # what DefaultLoadPlanner.load_bytes does with the object
            _default_planner.set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def load_dcp(state: dict[str, Any], ckpt, **kwargs: Any) -> None:
    """``dcp.load(state)`` from ``ckpt`` in place, through :class:`SafeFileSystemReader` and
    :class:`SafeLoadPlanner` (``kwargs`` go to ``dcp.load``, e.g. ``no_dist=True``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader = SafeFileSystemReader(str(ckpt))
    if (Path(ckpt) / DCP_METADATA).is_file():
        reader.read_metadata()  # a refusal here is raised as it is, not folded into DCP's rank fallback
    try:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), **kwargs)
    except CheckpointException as e:  # a BaseException holding each rank's error: surface a refusal by name
        for exc, _trace in e.failures.values():
            if isinstance(exc, UnsafeCheckpointError):
                raise UnsafeCheckpointError(str(exc)) from None
        raise
