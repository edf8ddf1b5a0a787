"""Decoders over one :class:`CachedLM` interface: AR, block diffusion, linear and quadratic self-speculation.

Pure PyTorch (torch + stdlib only). Every decoder has the signature
``(model, prompts, cfg, return_cache=False) -> list[DecodeResult]`` and reports exact forward counts
(prefill excluded) from which TPF is computed. Every mode decodes a batch of prompts of different
lengths, and row i of a batch equals decoding prompt i alone. ``generate`` dispatches by mode name.
"""

from __future__ import annotations

from typing import Callable

from .ar import ar_generate
from .config import DecodeConfig
from .diffusion import diffusion_generate
from .interface import CachedLM
from .linear_spec import linear_spec_generate
from .quadratic_spec import quadratic_spec_generate
from .result import DecodeResult, DecodeStats

__all__ = ["MODES", "generate", "ar_generate", "diffusion_generate", "linear_spec_generate",
           "quadratic_spec_generate", "DecodeConfig", "DecodeResult", "DecodeStats", "CachedLM"]

Decoder = Callable[..., list[DecodeResult]]

MODES: dict[str, Decoder] = {
    "ar": ar_generate,
    "diffusion": diffusion_generate,
    "linear_spec": linear_spec_generate,
    "quadratic_spec": quadratic_spec_generate,
}


def generate(model: CachedLM, prompts: list[list[int]], mode: str, cfg: DecodeConfig,
             return_cache: bool = False) -> list[DecodeResult]:
    """Decode ``prompts`` with ``mode`` (a key of :data:`MODES`); one result per prompt, in order."""
    if mode not in MODES:
        raise ValueError(f"unknown decoding mode {mode!r}; choose one of {sorted(MODES)}")
    return MODES[mode](model, prompts, cfg, return_cache=return_cache)
