"""What the export options mean: the weights' dtype and the safetensors shard size, checked before
anything is written (:class:`ExportError` naming the value)."""

from __future__ import annotations

import re

import torch

from ..models.dtypes import ALIASES, DTYPES
from .errors import ExportError

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "dtype_name", "shard_size"]

DEFAULT_MAX_SHARD_SIZE = "5GB"


def dtype_name(dtype: str | torch.dtype) -> str:
    """The canonical name (a key of :data:`~nemodiff_train.models.dtypes.DTYPES`); fp32 / bf16 accepted too."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if ALIASES.get(dtype, dtype) not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not supported; choose float32 or bfloat16")
    return ALIASES.get(dtype, dtype)


_SIZE = re.compile(r"^\d+(\.\d+)?[KMGT]B$")


def shard_size(value: str | int) -> str | int:
    """``max_shard_size`` as save_pretrained takes it: bytes (int or digit string) or e.g. ``500MB``, ``5GB``."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and _SIZE.match(value.strip().upper()):
        return value.strip().upper()
    raise ExportError(f"max_shard_size {value!r} is not a size (e.g. 500MB, 5GB, or a number of bytes)")
