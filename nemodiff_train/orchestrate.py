"""What ``nemodiff-train`` runs, above both engines: train (an engine) → export → evaluate → push.

The engines only train (data preparation included, since it needs the tokenizer each engine writes
first); each returns a :class:`~nemodiff_train.engines.TrainOutcome`. When the run's last stage has
trained to its end, this module does the rest on the one rank that does long work while the others
wait without a pending collective (``outcome.on_main``):

* ``export.at_end`` → :func:`export_any` of the run into ``<run.dir>/hf``: the one exporter
  (:mod:`nemodiff_train.export`) for both engines. A Megatron run's latest checkpoint is first
  converted by its engine (AutoBridge) into a temporary HF directory; a requeued Megatron job whose
  export is already of the latest checkpoint exports nothing;
* torch engine: then ``eval.at_end`` → :func:`evaluate_at_end` (``eval/``, ``eval_summary.json``,
  the model card refreshed); then ``export.push_to_hub``.

:func:`export_any` is also ``nemodiff-export``'s source dispatch.
The run directory's layout is :mod:`nemodiff_train.runs`'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .config.schema import Config
from .engines import TrainOutcome

__all__ = ["train", "finish", "evaluate_at_end", "export_any"]


def train(cfg: Config, run_dir: Path, *, validation_hooks: Sequence = (), engine_options: dict | None = None) -> Path:
    """Train ``cfg`` with its engine into ``run_dir``, then :func:`finish`; returns the run directory.

    Args:
        validation_hooks: torch engine only: measurements at each validation (e.g. the decode probe).
        engine_options: extra keyword arguments of the engine's entry point (test hooks, e.g. the
            Megatron engine's ``callbacks``).
    """
    if cfg.engine.name == "megatron":
        from .engines.megatron.train import run as megatron_run

        outcome = megatron_run(cfg, **(engine_options or {}))  # run.dir is required: shared by every job
    else:
        from .engines.torch.trainer import train as torch_train

        outcome = torch_train(cfg, run_dir, validation_hooks=validation_hooks, **(engine_options or {}))
    try:
        finish(cfg, outcome)
    finally:
        outcome.close()
    return outcome.run_dir


def finish(cfg: Config, outcome: TrainOutcome) -> None:
    """The work after training (see the module docstring); nothing when the run stopped early."""
    if outcome.finished and cfg.export.at_end:
        outcome.on_main("finish", lambda: _finish(cfg, outcome))


def _finish(cfg: Config, outcome: TrainOutcome) -> None:
    """Export, then (torch engine) evaluate and push the final checkpoint (``export.at_end``,
    ``eval.at_end``, ``export.push_to_hub`` with ``export.private``)."""
    from . import runs
    from .export import ExportError, push_to_hub

    run_dir = outcome.run_dir
    out = run_dir / runs.EXPORT_DIR
    if cfg.engine.name == "megatron":
        from .engines.megatron.export import export_is_current

        if export_is_current(cfg, run_dir):  # a requeued job after the end
            return
    export_any(run_dir, out, dtype=cfg.export.dtype, remote_code=cfg.export.remote_code, overwrite=True)
    outcome.message(f"exported {out}")
    if cfg.export.merge:  # adapter runs only (validated): a diffusion-only full copy beside the adapter
        merged = run_dir / runs.MERGED_EXPORT_DIR
        export_any(run_dir, merged, dtype=cfg.export.dtype, remote_code=cfg.export.remote_code, overwrite=True,
                   merge=True)
        outcome.message(f"exported {merged} (adapter merged: diffusion-only)")
    if cfg.engine.name == "megatron":  # eval.at_end / push_to_hub are refused for it at validation
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
                                     limit=e.limit, max_new_tokens=e.max_new_tokens,
                                     block_size=e.block_size or cfg.diffusion.inference_block_size,
                                     threshold=e.threshold, seed=cfg.run.seed, batch_size=e.batch_size,
                                     base_model=str(resolve_model_path(cfg.model.path)) if e.compare_base else None,
                                     sweep=SweepConfig(list(e.sweep.threshold), list(e.sweep.block_size),
                                                       list(e.sweep.tasks))))
    message(f"evaluation written to {out}")
    write_model_card(run_dir / runs.EXPORT_DIR, eval_json=out / runs.EVAL_JSON)
    (run_dir / runs.EVAL_SUMMARY).write_text(json.dumps(rows, indent=1))
    return rows


def export_any(checkpoint: str | Path, out: str | Path, *, dtype: str = "float32", remote_code: bool = False,
               eval_json: str | Path | None = None, overwrite: bool = False,
               max_shard_size: str | int = "5GB", merge: bool = False) -> Path:
    """``nemodiff-export``: any source (torch run, checkpoint, HF directory, Megatron run) → ``out``.

    A Megatron run directory (:func:`nemodiff_train.runs.is_megatron_run`) is first converted by the
    Megatron engine (AutoBridge, float32) into a temporary directory beside ``out``, so it gets the
    same layout, ``nemodiff`` record, remote code and model card as a torch run. Other arguments as
    :func:`nemodiff_train.export.export_checkpoint`.
    """
    from . import runs
    from .export import ExportError, export_checkpoint

    if not runs.is_megatron_run(checkpoint):
        return export_checkpoint(checkpoint, out, dtype=dtype, remote_code=remote_code, eval_json=eval_json,
                                 overwrite=overwrite, max_shard_size=max_shard_size, merge=merge)
    import tempfile

    run_dir, out = Path(checkpoint), Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:  # fail before the long conversion
        raise ExportError(f"output directory {out} is not empty (pass overwrite=true to replace it)")
    from .engines.megatron.export import bridge_unavailable, convert_run

    problem = bridge_unavailable()
    if problem:
        raise ExportError(f"{run_dir} is a Megatron run: {problem}")

    out.parent.mkdir(parents=True, exist_ok=True)
    if eval_json is None and (run_dir / runs.EVAL_DIR / runs.EVAL_JSON).is_file():
        eval_json = run_dir / runs.EVAL_DIR / runs.EVAL_JSON
    with tempfile.TemporaryDirectory(prefix=".megatron-hf-", dir=out.parent) as tmp:
        try:
            hf = convert_run(run_dir, Path(tmp) / "hf", dtype="float32")
        except FileNotFoundError as e:
            raise ExportError(f"{run_dir} is a Megatron run, but: {e}") from None
        return export_checkpoint(hf, out, dtype=dtype, remote_code=remote_code, eval_json=eval_json,
                                 overwrite=overwrite, max_shard_size=max_shard_size)
