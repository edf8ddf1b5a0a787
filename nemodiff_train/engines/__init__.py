"""The training engines, siblings that only train: :mod:`.torch` and :mod:`.megatron`.

Each engine's entry point returns a :class:`TrainOutcome`. What comes after training (the export,
the evaluation, the Hub push) is :mod:`nemodiff_train.orchestrate`'s, above both engines. Neither
engine imports the other, ``eval/`` or ``export/``; what both need lives below them in ``data/``,
``models/``, ``core/`` or :mod:`nemodiff_train.runs` (tests/unit/test_import_boundaries.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = ["TrainOutcome"]


def _nothing() -> None:
    return None


@dataclass
class TrainOutcome:
    """What an engine hands back to the orchestration when its training returns.

    Attributes:
        run_dir: the run directory.
        finished: the run's last stage trained to its end in this launch (``False``: stopped by a
            signal, or a Megatron job of an earlier stage); only then does the run export.
        on_main: ``on_main(name, fn)`` runs ``fn()`` on the one rank that does long work while the
            other ranks wait without a pending collective, and returns its result (``None`` on
            ranks that did not run it). One process: just ``fn()``.
        message: prints a line on the run's console (rank 0 only).
        close: closes the run's metrics (called once, after the work at the end).
    """

    run_dir: Path
    finished: bool
    on_main: Callable[[str, Callable[[], Any]], Any]
    message: Callable[[str], None] = print
    close: Callable[[], None] = field(default=_nothing)
