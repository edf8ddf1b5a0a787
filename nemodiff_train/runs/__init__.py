"""The run directory's layout, in one place: file names, checkpoint naming, listing, the ``nemodiff`` record.

::

    <run.dir>/
      config.yaml          CONFIG_FILE: the resolved config
      metrics.jsonl        METRICS_FILE
      hf_base/             HF_BASE_DIR: the DLM-ified architecture (torch engine), no weights
      data/<stage>/        DATA_DIR: prepared data
      checkpoints/         CHECKPOINTS_DIR
        step_XXXXXXXX/     torch engine (checkpoint_dir): DCP shards, rng/, trainer_state.json,
                           manifest.json, COMPLETE last
        <i>_<stage>/       Megatron engine (megatron_stage_dir): iter_XXXXXXX/ and
                           latest_checkpointed_iteration.txt
      megatron/            Megatron engine: hf_init/ and the indexed datasets
      hf/                  EXPORT_DIR: the exported Hugging Face checkpoint
      eval/                EVAL_DIR: eval.json, samples.jsonl, ...
      eval_summary.json    EVAL_SUMMARY

Both engines, the exporter, the evaluator and the CLIs read these names from here. Reading a
torch-engine checkpoint's DCP files safely is :mod:`.dcp`'s. Nothing here imports an engine.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = ["CONFIG_FILE", "METRICS_FILE", "CHECKPOINTS_DIR", "HF_BASE_DIR", "MERGED_EXPORT_DIR", "DATA_DIR", "EXPORT_DIR", "EVAL_DIR",
           "EVAL_JSON", "EVAL_SUMMARY", "COMPLETE", "TRAINER_STATE", "MANIFEST", "RNG_DIR", "DCP_METADATA",
           "MEGATRON_LATEST", "MEGATRON_DIR", "stage_data_dir", "checkpoint_dir", "step_of", "step_dirs", "list_checkpoints", "latest_checkpoint",
           "megatron_stage_dir", "megatron_iteration_name", "megatron_init_dir", "megatron_data_dir", "is_megatron_run", "stage_record", "run_record"]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
HF_BASE_DIR = "hf_base"
MERGED_EXPORT_DIR = "hf_merged"  # adapter runs with export.merge=true: the adapter folded into a full copy
DATA_DIR = "data"
EXPORT_DIR = "hf"
EVAL_DIR = "eval"
EVAL_JSON = "eval.json"
EVAL_SUMMARY = "eval_summary.json"

# One torch-engine checkpoint: checkpoints/step_XXXXXXXX/ (8 digits, so names sort like steps).
_STEP_DIR = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"  # written last: a directory without it is an interrupted save
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
RNG_DIR = "rng"
DCP_METADATA = ".metadata"

# Megatron-Bridge's own layout inside a stage's save directory.
MEGATRON_LATEST = "latest_checkpointed_iteration.txt"
MEGATRON_DIR = "megatron"


def stage_data_dir(run_dir: str | Path, stage_name: str) -> Path:
    """``<run>/data/<stage name>``: where a stage's data is prepared unless ``data.prepared_dir`` is set."""
    return Path(run_dir) / DATA_DIR / stage_name


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """``<run>/checkpoints/step_XXXXXXXX`` of optimizer step ``step``."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{step:08d}"


def step_of(path: str | Path) -> int | None:
    """The step a checkpoint directory's name says (``step_00000012`` → 12), or ``None`` for another name."""
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def step_dirs(run_dir: str | Path) -> list[Path]:
    """``step_XXXXXXXX`` directories of a run (complete or not), oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if step_of(p) is not None and p.is_dir()), key=lambda p: p.name)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints with a ``COMPLETE`` marker, oldest first (not verified; the torch engine verifies)."""
    return [p for p in step_dirs(run_dir) if (p / COMPLETE).is_file()]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint with a ``COMPLETE`` marker, or ``None``."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def megatron_stage_dir(run_dir: str | Path, stage_index: int, stage_name: str) -> Path:
    """``<run>/checkpoints/<i>_<stage name>``: the Megatron engine's save directory of one stage."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"{stage_index}_{stage_name}"


def megatron_iteration_name(iteration: int) -> str:
    """``iter_XXXXXXX``: Megatron's directory of one saved iteration."""
    return f"iter_{iteration:07d}"


def megatron_init_dir(run_dir: str | Path) -> Path:
    """``<run>/megatron/hf_init``: the HF directory the Megatron engine writes when the source needs a
    mask token or an untied head."""
    return Path(run_dir) / MEGATRON_DIR / "hf_init"


def megatron_data_dir(run_dir: str | Path, stage_index: int, stage_name: str) -> Path:
    """``<run>/megatron/data/<i>_<stage name>``: a stage's prepared data as Megatron indexed datasets."""
    return Path(run_dir) / MEGATRON_DIR / DATA_DIR / f"{stage_index}_{stage_name}"


def is_megatron_run(path: str | Path) -> bool:
    """True for a Megatron-engine run directory (a stage save directory holding :data:`MEGATRON_LATEST`)."""
    root = Path(path) / CHECKPOINTS_DIR
    return root.is_dir() and any(root.glob(f"*/{MEGATRON_LATEST}"))


def stage_record(name: Any, kind: Any, steps: Any, sources: Any, seq_len: Any, global_batch_size: Any) -> dict:
    """One entry of the ``nemodiff`` record's ``stages`` list."""
    return {"name": name, "kind": kind, "steps": steps, "sources": list(sources or []), "seq_len": seq_len,
            "global_batch_size": global_batch_size}


def run_record(cfg, mask_token_id: int, **extra: Any) -> dict[str, Any]:
    """The ``nemodiff`` record of a run's ``config.json`` (DLM settings + provenance) from its typed config.

    Written into ``hf_base/`` (torch engine) and ``megatron/hf_init/`` (Megatron engine); the exporter
    completes it (:func:`nemodiff_train.export.writer.nemodiff_record`). ``extra`` adds keys (e.g.
    ``engine="megatron"``).
    """
    d = cfg.diffusion
    return {"mask_token_id": int(mask_token_id), "train_block_size": d.block_size,
            "inference_block_size": d.inference_block_size, "attention_pattern": d.pattern, "alpha": d.alpha,
            "beta": d.beta, "noise_schedule": d.schedule, "recipe": cfg.recipe,
            "base_model": cfg.model.hub_id or cfg.model.path, "base_model_revision": cfg.model.revision, **extra,
            "stages": [stage_record(s.name, s.kind, s.steps, s.data.sources, s.data.seq_len, s.global_batch_size)
                       for s in cfg.stages]}
