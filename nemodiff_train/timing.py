"""The interleaved timing protocol shared by ``nemodiff-bench`` and ``nemodiff-eval`` (below both, so
neither imports the other).

Every timed run decodes the same prompts; the runs take turns chunk by chunk (one chunk = one decoder
call, ``batch`` prompts or a single prompt), so a burst of load on a shared machine hits every mode
alike and the ratios between modes stay meaningful even when absolute numbers drift. Warm-up calls
(kernel selection, allocator growth, CUDA-graph capture) run first and are not timed; with
``repeats > 1`` the whole interleaved pass is repeated and each repeat gives one tokens/s sample per
run (median and spread are the caller's). Only the decoder calls are timed, between device syncs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["TimedRun", "run_interleaved", "spread"]


@dataclass
class TimedRun:
    """One setting to time.

    Attributes:
        name: label (a mode, a sweep point, ``hf_generate``).
        call: decodes a list of prompts, returns one result per prompt.
        chunk: prompts per call (the batch size; 1 for the batch-1 modes).
        results: per prompt, the results of the LAST repeat (the protocol is deterministic at T = 0).
        seconds: per repeat, the summed time of this run's calls.
    """

    name: str
    call: Callable[[list[list[int]]], list[Any]]
    chunk: int = 1
    results: list[Any] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def run_interleaved(runs: list[TimedRun], prompts: list[list[int]], repeats: int = 1, warmups: int = 1,
                    warmup: Callable[[TimedRun], None] | None = None, device: torch.device | None = None) -> list[TimedRun]:
    """Time every run over ``prompts``, interleaved chunk by chunk (see the module docstring).

    Args:
        runs: the settings; each run's chunks are ``prompts[i:i + run.chunk]``.
        repeats: timed passes over all prompts (each gives one ``seconds`` entry per run).
        warmups: untimed warm-up calls per run before timing.
        warmup: what one warm-up call does (default: ``run.call`` on the run's first chunk).
        device: synchronised around every timed call when it is a CUDA device.
    Returns:
        ``runs``, with ``results`` and ``seconds`` filled in.
    """
    if not prompts:
        raise ValueError("no prompts to time")
    if repeats < 1 or warmups < 0:
        raise ValueError(f"repeats must be >= 1 and warmups >= 0, got {repeats}, {warmups}")
    for run in runs:
        for _ in range(warmups):
            (warmup or (lambda r: r.call(prompts[:r.chunk])))(run)
    widest = max(run.chunk for run in runs)
    for rep in range(repeats):
        last = rep == repeats - 1
        for run in runs:
            run.seconds.append(0.0)
            if last:
                run.results = []
        for start in range(0, len(prompts), widest):  # a window of `widest` prompts: every run decodes it in turn
            window = prompts[start:start + widest]
            for run in runs:
                for i in range(0, len(window), run.chunk):
                    _sync(device)
                    t0 = time.perf_counter()
                    out = run.call(window[i:i + run.chunk])
                    _sync(device)
                    run.seconds[-1] += time.perf_counter() - t0
                    if last:
                        run.results.extend(out)
    return runs


def spread(values: list[float]) -> dict[str, float]:
    """Median, min, max and relative spread ((max - min) / median) of a list of samples."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "rel_spread": (max(values) - min(values)) / med if med else 0.0, "n": len(values)}
