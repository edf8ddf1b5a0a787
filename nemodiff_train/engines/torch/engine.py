"""The torch engine as an :class:`~nemodiff_train.engines.Engine`: :func:`.trainer.train`, and runs the
exporter reads directly (its DCP checkpoints; :mod:`nemodiff_train.export`)."""

from __future__ import annotations

from pathlib import Path

from ... import runs
from .. import TrainOptions, TrainOutcome, as_is

__all__ = ["TorchEngine"]


class TorchEngine:
    """One process or ``torchrun``; trains every stage of a run in one launch."""

    name = "torch"
    evaluates_at_end = True

    def train(self, cfg, run_dir: Path, options: TrainOptions) -> TrainOutcome:
        if options.callbacks or options.forward_step is not None:
            raise ValueError("TrainOptions.callbacks / forward_step are Megatron-engine options; the torch "
                             "engine takes validation_hooks and loss_terms")
        from .trainer import train

        return train(cfg, run_dir, validation_hooks=options.validation_hooks, loss_terms=options.loss_terms)

    def owns_run(self, path: Path) -> bool:
        return bool(runs.step_dirs(path))

    def export_is_current(self, cfg, run_dir: Path) -> bool:
        return False  # a torch run exports once, at its end: there is no requeued job after it

    def export_source(self, path: Path, out: Path, *, overwrite: bool):
        return as_is(path)
