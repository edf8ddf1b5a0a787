"""Learning-rate schedules of one stage: warmup-stable-decay (NLD recipe) and cosine.

Pure functions of the step, so a resumed run gets the learning rate from the step alone.
"""

from __future__ import annotations

import math

__all__ = ["lr_at"]


def lr_at(step: int, total: int, *, name: str, peak: float, minimum: float, warmup_fraction: float,
          decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of a stage of ``total`` steps.

    wsd: linear warmup to ``peak``, constant, then a linear decay to ``minimum`` over the last
    ``decay_fraction`` of the steps. cosine: warmup, then cosine from ``peak`` to ``minimum``.
    """
    warmup = int(round(warmup_fraction * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    if name == "constant":
        return peak
    if name == "wsd":
        decay = int(round(decay_fraction * total))
        decay_start = total - decay
        if step < decay_start or decay == 0:
            return peak
        frac = (step - decay_start + 1) / decay
        return peak + (minimum - peak) * min(frac, 1.0)
    if name == "cosine":
        span = max(total - warmup, 1)
        frac = min((step - warmup) / span, 1.0)
        return minimum + 0.5 * (peak - minimum) * (1 + math.cos(math.pi * frac))
    raise ValueError(f"unknown schedule {name!r}")
