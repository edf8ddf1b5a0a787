"""The training engines, siblings that only train: :mod:`.torch` and :mod:`.megatron`.

Each engine implements :class:`Engine`: ``train(cfg, run_dir, options) -> TrainOutcome``, plus what
the export needs from a run it wrote. The orchestration (:mod:`nemodiff_train.orchestrate`) picks
one with :func:`get_engine` (``engine.name``) or :func:`engine_of_run` (a run directory's layout)
and never branches on an engine's name. What comes after training (the export, the evaluation, the
Hub push) is the orchestration's, above both engines. Neither engine imports the other, ``eval/`` or
``export/``; what both need lives below them in ``data/``, ``models/``, ``core/``,
:mod:`nemodiff_train.runs` or here (tests/unit/test_import_boundaries.py).

Engines are registered by module path and imported when asked for, so importing this package
imports neither engine (nor Megatron).
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Protocol, Sequence

__all__ = ["TrainOutcome", "TrainOptions", "Engine", "ENGINES", "DEFAULT_ENGINE", "get_engine", "engine_of_run", "as_is",
           "ExportSource", "ExportSourceError"]


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


@dataclass
class TrainOptions:
    """What a caller hands an engine beside the config: code, not settings (settings are the config's).

    An engine refuses options it cannot honour (:meth:`Engine.train`) rather than ignoring them.

    Attributes:
        validation_hooks: torch engine: ``hook(dlm) -> metrics`` run on rank 0 at every validation
            (``nemodiff-train`` passes the decode probe).
        loss_terms: torch engine: extra loss terms (:class:`~.torch.loss.LossTerm`) added to the
            joint loss (:class:`~.torch.trainer.StageRun` says how).
        callbacks: Megatron engine: more ``pretrain`` callbacks after the metrics writer (tests).
        forward_step: Megatron engine: replaces its forward step (tests).
    """

    validation_hooks: Sequence[Callable] = ()
    loss_terms: Sequence[Any] = ()
    callbacks: Sequence[Any] = ()
    forward_step: Any = None


class Engine(Protocol):
    """A training engine, as the orchestration sees it.

    Attributes:
        name: the ``engine.name`` that selects it.
        evaluates_at_end: ``eval.at_end`` and ``export.push_to_hub`` run after its training (the
            config refuses them for an engine without).
    """

    name: str
    evaluates_at_end: bool

    def train(self, cfg, run_dir: Path, options: TrainOptions) -> TrainOutcome:
        """Train (or resume) ``cfg`` in ``run_dir``; a signal ends it early with ``finished=False``."""
        ...

    def owns_run(self, path: Path) -> bool:
        """``path`` is a run directory this engine wrote (and :meth:`export_source` must convert)."""
        ...

    def export_is_current(self, cfg, run_dir: Path) -> bool:
        """``<run.dir>/hf`` already holds the export of the run's latest checkpoint (nothing to do)."""
        ...

    def export_source(self, path: Path, out: Path, *, overwrite: bool) -> ContextManager["ExportSource"]:
        """A context giving what :func:`nemodiff_train.export.export_checkpoint` reads for ``path``
        (the path itself, or a converted temporary HF directory beside ``out``); raises
        :class:`ExportSourceError` when it cannot."""
        ...


@dataclass
class ExportSource:
    """What the exporter reads for a run: ``path`` (a run, checkpoint or HF directory) and the run's
    ``eval.json`` when the exporter could not find it from ``path`` itself (else ``None``)."""

    path: Path
    eval_json: Path | None = None


class ExportSourceError(Exception):
    """A run cannot be handed to the exporter (the orchestration reports it as an export error)."""


ENGINES: dict[str, str] = {
    "torch": "nemodiff_train.engines.torch.engine:TorchEngine",
    "megatron": "nemodiff_train.engines.megatron.engine:MegatronEngine",
}
"""``engine.name`` → ``module:class`` of its :class:`Engine` (imported when asked for)."""


def get_engine(name: str) -> Engine:
    """The engine registered as ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in ENGINES:
        raise ValueError(f"engine.name={name!r} is not an engine; known: {sorted(ENGINES)}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)()


DEFAULT_ENGINE = "torch"
"""``engine.name``'s default, and the engine that exports what no engine claims as its run (an HF
directory, one checkpoint directory): the torch engine's exporter reads those directly."""


def engine_of_run(path: str | Path) -> Engine:
    """The engine whose run directory ``path`` is (:meth:`Engine.owns_run`), else :data:`DEFAULT_ENGINE`."""
    owners = [engine for engine in map(get_engine, ENGINES) if engine.owns_run(Path(path))]
    return owners[0] if owners else get_engine(DEFAULT_ENGINE)


@contextlib.contextmanager
def as_is(path: Path):
    """:meth:`Engine.export_source` of a source the exporter reads directly."""
    yield ExportSource(Path(path))
