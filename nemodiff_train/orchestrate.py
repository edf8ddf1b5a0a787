"""What ``nemodiff-train`` runs, above both engines: train (an engine) → export → evaluate → push.

The engines only train (data preparation included, since it needs the tokenizer each engine writes
first); each is an :class:`~nemodiff_train.engines.Engine`, picked from the registry by
``engine.name`` (no branch here on an engine's name), and returns a
:class:`~nemodiff_train.engines.TrainOutcome`. When the run's last stage has
trained to its end, this module does the rest on the one rank that does long work while the others
wait without a pending collective (``outcome.on_main``):

* ``export.at_end`` → :func:`export_any` of the run into ``<run.dir>/hf``: the one exporter
  (:mod:`nemodiff_train.export`) for both engines. A Megatron run's latest checkpoint is first
  converted by its engine (AutoBridge) into a temporary HF directory; a requeued Megatron job whose
  export is already of the latest checkpoint exports nothing;
* an engine that ``evaluates_at_end`` (torch): then ``eval.at_end`` → :func:`evaluate_at_end` (``eval/``, ``eval_summary.json``,
  the model card refreshed); then ``export.push_to_hub``.

:func:`export_any` is also ``nemodiff-export``'s source dispatch.
The run directory's layout is :mod:`nemodiff_train.runs`'s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from .config.schema import Config
from .engines import Engine, ExportSourceError, TrainOptions, TrainOutcome, engine_of_run, get_engine

__all__ = ["train", "finish", "evaluate_at_end", "export_any"]


def train(cfg: Config, run_dir: Path, options: TrainOptions | None = None) -> Path:
    """Train ``cfg`` with its engine (``engine.name``, :func:`~nemodiff_train.engines.get_engine`) into
    ``run_dir``, then :func:`finish`; returns the run directory.

    Args:
        options: what the caller hands the engine beside the config (validation hooks, extra loss
            terms, test callbacks: :class:`~nemodiff_train.engines.TrainOptions`).
    """
    engine = get_engine(cfg.engine.name)
    outcome = engine.train(cfg, run_dir, options or TrainOptions())
    try:
        finish(cfg, outcome, engine)
    finally:
        outcome.close()
    return outcome.run_dir


def finish(cfg: Config, outcome: TrainOutcome, engine: Engine | None = None) -> None:
    """The work after training (see the module docstring); nothing when the run stopped early."""
    engine = engine or get_engine(cfg.engine.name)
    if outcome.finished and cfg.export.at_end:
        outcome.on_main("finish", lambda: _finish(cfg, outcome, engine))


def _finish(cfg: Config, outcome: TrainOutcome, engine: Engine) -> None:
    """Export, then (torch engine) evaluate and push the final checkpoint (``export.at_end``,
    ``eval.at_end``, ``export.push_to_hub`` with ``export.private``)."""
    from . import runs
    from .export import ExportError, push_to_hub

    run_dir = outcome.run_dir
    out = run_dir / runs.EXPORT_DIR
    if engine.export_is_current(cfg, run_dir):  # a requeued job after the end
        return
    export_any(run_dir, out, dtype=cfg.export.dtype, remote_code=cfg.export.remote_code, overwrite=True)
    outcome.message(f"exported {out}")
    if cfg.export.merge:  # adapter runs only (validated): a diffusion-only full copy beside the adapter
        merged = run_dir / runs.MERGED_EXPORT_DIR
        export_any(run_dir, merged, dtype=cfg.export.dtype, remote_code=cfg.export.remote_code, overwrite=True,
                   merge=True)
        outcome.message(f"exported {merged} (adapter merged: diffusion-only)")
    if not engine.evaluates_at_end:  # eval.at_end / push_to_hub are refused for it at validation
        return
    if cfg.eval.at_end:
        evaluate_at_end(cfg, run_dir, outcome.message)
    if cfg.export.push_to_hub:
        try:
            push_to_hub(out, cfg.export.push_to_hub, private=cfg.export.private)
        except Exception as e:  # the export is on disk: say how to retry the push alone
            raise ExportError(f"export.push_to_hub={cfg.export.push_to_hub}: the upload of {out} failed ({e}); "
                              f"retry with: nemodiff-export out={out} push_to_hub={cfg.export.push_to_hub} "
                              f"private={str(cfg.export.private).lower()}") from None
        outcome.message(f"pushed {out} to {cfg.export.push_to_hub}")


def evaluate_at_end(cfg: Config, run_dir: Path, message=print) -> list[dict[str, Any]]:
    """Evaluate ``<run.dir>/hf`` in every configured mode into ``<run.dir>/eval``, refresh its model
    card and write ``<run.dir>/eval_summary.json``; returns the ``eval.json`` rows."""
    from . import runs
    from .eval.runner import EvalConfig, SweepConfig, run_evaluation
    from .assets.resolve import resolve_model_path
    from .export import write_model_card

    e = cfg.eval
    out = run_dir / runs.EVAL_DIR
    rows = run_evaluation(EvalConfig(model=str(run_dir / runs.EXPORT_DIR), modes=list(e.modes), out=str(out),
                                     task=e.task if isinstance(e.task, str) else list(e.task),
                                     limit=dict(e.limit) if isinstance(e.limit, Mapping) else e.limit,
                                     max_new_tokens=e.max_new_tokens,
                                     block_size=e.block_size or cfg.diffusion.inference_block_size,
                                     threshold=e.threshold, commit_rule=e.commit_rule, seed=cfg.run.seed,
                                     batch_size=e.batch_size,
                                     base_model=str(resolve_model_path(cfg.model.path, cfg.model.revision)) if e.compare_base else None,
                                     sweep=SweepConfig(**{f.name: list(getattr(e.sweep, f.name))
                                                          for f in fields(SweepConfig)})))
    message(f"evaluation written to {out}")
    write_model_card(run_dir / runs.EXPORT_DIR, eval_json=out / runs.EVAL_JSON)
    (run_dir / runs.EVAL_SUMMARY).write_text(json.dumps(rows, indent=1))
    return rows


def export_any(checkpoint: str | Path, out: str | Path, *, dtype: str = "float32", remote_code: bool = False,
               eval_json: str | Path | None = None, overwrite: bool = False,
               max_shard_size: str | int = "5GB", merge: bool = False) -> Path:
    """``nemodiff-export``: any source (torch run, checkpoint, HF directory, Megatron run) → ``out``.

    The engine whose run ``checkpoint`` is (:func:`~nemodiff_train.engines.engine_of_run`) hands the
    exporter its source: a Megatron run is first converted (AutoBridge, float32) into a temporary
    directory beside ``out``, so it gets the same layout, ``nemodiff`` record, remote code and model
    card as a torch run. Other arguments as :func:`nemodiff_train.export.export_checkpoint`.
    """
    from .export import ExportError, export_checkpoint
    from .export import check_replaceable

    check_replaceable(Path(out), overwrite)  # before a long conversion: replace only an earlier export, never `out=.`
    try:
        with engine_of_run(checkpoint).export_source(Path(checkpoint), Path(out), overwrite=overwrite) as source:
            return export_checkpoint(source.path, out, dtype=dtype, remote_code=remote_code,
                                     eval_json=eval_json if eval_json is not None else source.eval_json,
                                     overwrite=overwrite, max_shard_size=max_shard_size, merge=merge)
    except ExportSourceError as e:
        raise ExportError(str(e)) from None
