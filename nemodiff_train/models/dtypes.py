"""The dtype names the configs and CLIs accept, mapped to torch dtypes once for the whole package."""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "ALIASES", "torch_dtype"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""Canonical names (what ``model.dtype``, ``export.dtype`` and ``nemodiff-eval dtype=`` take)."""
ALIASES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16"}
"""Short names (``engine.precision``) for the canonical ones."""


def torch_dtype(name: str) -> torch.dtype:
    """``float32`` / ``bfloat16`` (or ``fp32`` / ``bf16``) → the torch dtype; ``ValueError`` naming the choices."""
    key = ALIASES.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {sorted(DTYPES) + sorted(ALIASES)}")
    return DTYPES[key]
