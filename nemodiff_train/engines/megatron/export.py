"""Megatron checkpoint → Hugging Face directory, through ``AutoBridge``: the conversion step of an export.

This module does not write the product export. :func:`convert_run` writes an intermediate HF
directory (float32) that the one exporter of both engines, :mod:`nemodiff_train.export`, then
writes as ``<run.dir>/hf`` or ``nemodiff-export``'s ``out`` (remote code, model card, generation
config with every stop token, the ``nemodiff`` record): :func:`nemodiff_train.orchestrate.export_any`
composes the two, since the engines import no ``export/``.

The intermediate directory is the base architecture (loads with plain ``AutoModelForCausalLM``, or the original
``*ForConditionalGeneration`` class for multimodal bases) with the DLM settings in ``config.json``
under ``nemodiff`` (``mask_token_id``, ``train_block_size``, ``inference_block_size``,
``attention_pattern``, ``alpha``, ``beta``, ``recipe``, ...) and the tokenizer files of the HF
directory training started from. Runs on CPU in one process (gloo), whatever TP/PP trained it:
the distributed checkpoint is resharded on load.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


from ... import runs
from ...config.schema import Config
from ...models.dtypes import torch_dtype
from .model import DONE, auto_bridge, build_provider, dlm_record, mask_token_id_of

__all__ = ["latest_iteration_dir", "finished_iteration", "init_dir", "convert_to_hf", "convert_run", "export_is_current",
           "bridge_unavailable"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json", "tekken.json")


def latest_iteration_dir(save_dir: str | Path) -> Path:
    """``<save>/iter_XXXXXXX`` of the latest checkpoint (``latest_checkpointed_iteration.txt``)."""
    save_dir = Path(save_dir)
    marker = save_dir / runs.MEGATRON_LATEST
    if not marker.is_file():
        raise FileNotFoundError(f"{save_dir}: no Megatron checkpoint (no {runs.MEGATRON_LATEST})")
    text = marker.read_text().strip()
    path = save_dir / ("release" if text == "release" else runs.megatron_iteration_name(int(text)))
    if not path.is_dir():
        raise FileNotFoundError(f"{marker} names {path.name}, which does not exist")
    return path


def convert_to_hf(cfg: Config, checkpoint: str | Path, out: str | Path, *, hf_dir: str | Path,
                  stage_index: int = 0, dtype: str | None = None) -> Path:
    """Convert the latest (or given ``iter_*``) checkpoint under ``checkpoint`` into the HF directory ``out``.

    Args:
        cfg: the run's config (model family, DLM settings).
        checkpoint: a stage save directory or one ``iter_*`` directory.
        hf_dir: the HF directory training started from (config, tokenizer, remote code).
        dtype: ``float32`` / ``bfloat16`` (default ``cfg.export.dtype``).
    """
    checkpoint, out, hf_dir = Path(checkpoint), Path(out), Path(hf_dir)
    iter_dir = checkpoint if checkpoint.name.startswith(("iter_", "release")) else latest_iteration_dir(checkpoint)
    dtype = dtype or cfg.export.dtype
    tmp = out.with_name(out.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    # its own one-process gloo group: a launcher's rendezvous address (end of training) would clash
    saved = {k: os.environ.pop(k) for k in ("MASTER_ADDR", "MASTER_PORT") if k in os.environ}
    try:
        _convert_weights(cfg, iter_dir, tmp, hf_dir, stage_index, torch_dtype(dtype))
    finally:
        os.environ.update(saved)
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file() and not (tmp / name).is_file():
            shutil.copy2(hf_dir / name, tmp / name)
    conf_path = tmp / "config.json"
    conf = json.loads(conf_path.read_text())
    record = dict(conf.get("nemodiff") or {})
    record.update(dlm_record(cfg, mask_token_id_of(cfg, hf_dir)))
    record["export_dtype"] = dtype
    record["megatron_checkpoint"] = iter_dir.name
    conf["nemodiff"] = record
    conf["dtype"] = dtype
    if "torch_dtype" in conf:
        conf["torch_dtype"] = dtype
    conf["tie_word_embeddings"] = bool(conf.get("tie_word_embeddings", False)) and not cfg.model.untie_head
    conf_path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _convert_weights(cfg: Config, iter_dir: Path, out: Path, hf_dir: Path, stage_index: int, weight_dtype) -> None:
    """One process, CPU, gloo: build the model at TP=PP=1 (the checkpoint is resharded on load) and save it."""
    from dataclasses import replace

    from megatron.bridge.training.model_load_save import build_and_load_model, temporary_distributed_context

    one_rank = replace(cfg, engine=replace(cfg.engine, tp=1, pp=1, cp=1, ep=1, sequence_parallel=False,
                                           precision="fp32", device="cpu", recompute=None))
    with temporary_distributed_context(backend="gloo"):
        bridge = auto_bridge(hf_dir=hf_dir)
        provider = build_provider(one_rank, bridge, stage_index, cpu=True)
        model = build_and_load_model(str(iter_dir), provider, use_cpu_init=True, skip_temp_dist_context=True)
        bridge.save_hf_pretrained(model, out, show_progress=False, weight_dtype=weight_dtype)


def bridge_unavailable() -> str | None:
    """Why megatron-bridge cannot be imported here, or None when it can: checked before a long export."""
    try:
        import megatron.bridge  # noqa: F401
    except Exception as e:  # not installed, or its CUDA-only imports fail on this machine
        return (f"exporting it needs megatron-bridge importable (a NeMo container, or the CPU tier of "
                f"scripts/install_megatron_cpu.sh with the test shims of tests/megatron/support); import failed: "
                f"{type(e).__name__}: {e}")
    return None


def convert_run(run_dir: str | Path, out: str | Path, *, dtype: str | None = None) -> Path:
    """Convert a megatron run directory: the latest checkpoint of its last trained stage → the HF
    directory ``out``. Reads ``<run.dir>/config.yaml``; the HF init directory is
    ``<run.dir>/megatron/hf_init`` when training wrote one, else the configured model path."""
    from ...config.load import load_saved_config
    from .config import stage_checkpoint_dir

    run_dir = Path(run_dir)
    cfg = load_saved_config(run_dir / runs.CONFIG_FILE)
    stages = [i for i in range(len(cfg.stages))
              if (stage_checkpoint_dir(run_dir, cfg, i) / runs.MEGATRON_LATEST).is_file()]
    if not stages:
        raise FileNotFoundError(f"{run_dir}: no Megatron checkpoint under {run_dir / runs.CHECKPOINTS_DIR}")
    i = stages[-1]
    return convert_to_hf(cfg, stage_checkpoint_dir(run_dir, cfg, i), out, hf_dir=init_dir(cfg, run_dir),
                         stage_index=i, dtype=dtype)


def init_dir(cfg: Config, run_dir: str | Path) -> Path:
    """The HF directory training started from: ``<run.dir>/megatron/hf_init`` when training wrote one
    (:func:`.model.prepare_init_checkpoint`), else the configured model."""
    from ...assets.resolve import resolve_model_path

    init = runs.megatron_init_dir(run_dir)
    return init if (init / DONE).is_file() else resolve_model_path(cfg.model.path, cfg.model.revision)


def finished_iteration(save_dir: Path) -> int | None:
    """The iteration of a stage save directory's latest checkpoint, or ``None`` when it has none."""
    try:
        return int((Path(save_dir) / runs.MEGATRON_LATEST).read_text().strip())
    except (OSError, ValueError):
        return None


def export_is_current(cfg: Config, run_dir: str | Path) -> bool:
    """``<run.dir>/hf`` holds the export of the last stage's latest checkpoint (a requeued job after
    the end has nothing to export): its ``nemodiff.megatron_checkpoint`` names that iteration."""
    from .config import stage_checkpoint_dir

    run_dir = Path(run_dir)
    done = finished_iteration(stage_checkpoint_dir(run_dir, cfg, len(cfg.stages) - 1))
    try:
        rec = json.loads((run_dir / runs.EXPORT_DIR / "config.json").read_text()).get("nemodiff", {})
    except (OSError, ValueError):
        return False
    return done is not None and rec.get("megatron_checkpoint") == runs.megatron_iteration_name(done)
