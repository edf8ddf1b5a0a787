"""What the callers of the decoders say about the modes, derived from the registry (:data:`MODES`).

Kept out of ``decoding/__init__.py`` on purpose: the exporter inlines that module and what it imports
into ``modeling_nemodiff.py`` (:mod:`nemodiff_train.export.remote_code`), and none of this is needed there.
"""

from __future__ import annotations

from . import MODES

__all__ = ["ALL_MODES", "REFERENCE_MODE", "SPECULATIVE_MODES", "with_reference"]

ALL_MODES: tuple[str, ...] = tuple(MODES)
"""Every mode, in the registry's order (AR first): the order runs and reports list them in."""
REFERENCE_MODE = "ar"
"""The mode the others are measured against (``vs ar``, ``lossless``, the bench crossover)."""
SPECULATIVE_MODES: tuple[str, ...] = ("linear_spec", "quadratic_spec")
"""Diffusion drafts, AR verifies: at temperature 0 their output equals :data:`REFERENCE_MODE`'s token for token."""


def with_reference(modes) -> tuple[list[str], bool]:
    """``modes`` in registry order, with AR added first when a self-speculation mode needs it as the
    lossless reference and it was not asked for.

    Returns:
        ``(modes to run, whether AR was added only as the reference)``.
    """
    ordered = [m for m in ALL_MODES if m in modes]
    added = REFERENCE_MODE not in ordered and any(m in SPECULATIVE_MODES for m in ordered)
    return ([REFERENCE_MODE] + ordered if added else ordered), added
