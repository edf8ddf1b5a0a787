"""Reading a torch-engine checkpoint's DCP files without running untrusted code.

DCP's ``.metadata`` is a pickle. :class:`SafeFileSystemReader` reads it with an unpickler restricted
to DCP's metadata classes (anything else in the file is refused, and no code runs); tensors are read
with ``weights_only`` semantics by DCP itself. The torch engine loads checkpoints through it and the
exporter reads tensor shapes through it, so neither trusts a pickle the other wrote.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from . import DCP_METADATA

__all__ = ["CheckpointError", "SafeFileSystemReader"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, does not fit the model, or cannot be written."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP ``Metadata`` only: any other class in the file is refused (no code runs)."""

    def find_class(self, module: str, name: str):
        allowed = (module.startswith("torch.distributed.checkpoint.")
                   or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)))
                   or (module == "torch.serialization" and name == "_get_layout")
                   or (module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"))
                   or (module == "collections" and name == "OrderedDict"))
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a checkpoint's {DCP_METADATA}")
        return super().find_class(module, name)


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader whose ``.metadata`` pickle may only build DCP metadata classes."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not DCP metadata (a {type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
