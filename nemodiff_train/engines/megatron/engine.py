"""The Megatron engine as an :class:`~nemodiff_train.engines.Engine`: :func:`.train.run` (one stage per
job), and the conversion of its checkpoints into an HF directory the exporter reads (:mod:`.export`).

Nothing here imports Megatron at module level.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from ... import runs
from .. import ExportSource, ExportSourceError, TrainOptions, TrainOutcome

__all__ = ["MegatronEngine"]


class MegatronEngine:
    """Megatron-Bridge ``pretrain``, one stage (``engine.stage_index``) per job; ``run.dir`` shared by all."""

    name = "megatron"
    evaluates_at_end = False  # eval.at_end / export.push_to_hub are refused for it by the config

    def train(self, cfg, run_dir: Path, options: TrainOptions) -> TrainOutcome:
        """Train ``cfg``'s stage ``engine.stage_index`` in ``run.dir`` (required: shared by every rank
        and every job of a chain, so it is the config's, not ``run_dir``)."""
        if options.validation_hooks or options.loss_terms:
            raise ValueError("TrainOptions.validation_hooks / loss_terms are torch-engine options; the "
                             "Megatron engine takes callbacks and forward_step")
        from .train import run

        return run(cfg, forward_step=options.forward_step, callbacks=options.callbacks)

    def owns_run(self, path: Path) -> bool:
        return runs.is_megatron_run(path)

    def export_is_current(self, cfg, run_dir: Path) -> bool:
        from .export import export_is_current

        return export_is_current(cfg, run_dir)  # a requeued job after the end

    @contextlib.contextmanager
    def export_source(self, path: Path, out: Path, *, overwrite: bool):
        """Convert the latest checkpoint of the run's last trained stage (AutoBridge, float32) into a
        temporary HF directory beside ``out``, so the export gets the same layout, ``nemodiff``
        record, remote code and model card as a torch run's."""
        run_dir, out = Path(path), Path(out)
        if out.exists() and any(out.iterdir()) and not overwrite:  # fail before the long conversion
            raise ExportSourceError(f"output directory {out} is not empty (pass overwrite=true to replace it)")
        from .export import bridge_unavailable, convert_run

        problem = bridge_unavailable()
        if problem:
            raise ExportSourceError(f"{run_dir} is a Megatron run: {problem}")
        out.parent.mkdir(parents=True, exist_ok=True)
        eval_json = run_dir / runs.EVAL_DIR / runs.EVAL_JSON
        with tempfile.TemporaryDirectory(prefix=".megatron-hf-", dir=out.parent) as tmp:
            try:
                hf = convert_run(run_dir, Path(tmp) / "hf", dtype="float32")
            except FileNotFoundError as e:
                raise ExportSourceError(f"{run_dir} is a Megatron run, but: {e}") from None
            yield ExportSource(hf, eval_json if eval_json.is_file() else None)
