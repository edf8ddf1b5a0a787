"""Megatron checkpoint → Hugging Face directory, through ``AutoBridge``.

The result is the base architecture (loads with plain ``AutoModelForCausalLM``, or the original
``*ForConditionalGeneration`` class for multimodal bases) with the DLM settings in ``config.json``
under ``nemodiff`` (``mask_token_id``, ``train_block_size``, ``inference_block_size``,
``attention_pattern``, ``alpha``, ``beta``, ``recipe``, ...) and the tokenizer files of the HF
directory training started from. Runs on CPU in one process (gloo), whatever TP/PP trained it:
the distributed checkpoint is resharded on load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ...config.schema import Config
from .model import auto_bridge, build_provider, dlm_record, mask_token_id_of

__all__ = ["latest_iteration_dir", "export_to_hf", "export_run", "is_megatron_run", "export_run_dir"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json", "tekken.json")


def latest_iteration_dir(save_dir: str | Path) -> Path:
    """``<save>/iter_XXXXXXX`` of the latest checkpoint (``latest_checkpointed_iteration.txt``)."""
    save_dir = Path(save_dir)
    marker = save_dir / "latest_checkpointed_iteration.txt"
    if not marker.is_file():
        raise FileNotFoundError(f"{save_dir}: no Megatron checkpoint (no latest_checkpointed_iteration.txt)")
    text = marker.read_text().strip()
    path = save_dir / ("release" if text == "release" else f"iter_{int(text):07d}")
    if not path.is_dir():
        raise FileNotFoundError(f"{marker} names {path.name}, which does not exist")
    return path


def export_to_hf(cfg: Config, checkpoint: str | Path, out: str | Path, *, hf_dir: str | Path,
                 stage_index: int = 0, dtype: str | None = None) -> Path:
    """Export the latest (or given ``iter_*``) checkpoint under ``checkpoint`` to ``out``.

    Args:
        cfg: the run's config (model family, DLM settings).
        checkpoint: a stage save directory or one ``iter_*`` directory.
        hf_dir: the HF directory training started from (config, tokenizer, remote code).
        dtype: ``float32`` / ``bfloat16`` (default ``cfg.export.dtype``).
    """
    from dataclasses import replace

    from megatron.bridge.training.model_load_save import build_and_load_model, temporary_distributed_context

    checkpoint, out, hf_dir = Path(checkpoint), Path(out), Path(hf_dir)
    iter_dir = checkpoint if checkpoint.name.startswith(("iter_", "release")) else latest_iteration_dir(checkpoint)
    dtype = dtype or cfg.export.dtype
    weight_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    one_rank = replace(cfg, engine=replace(cfg.engine, tp=1, pp=1, cp=1, ep=1, sequence_parallel=False,
                                           precision="fp32", device="cpu", recompute=None))
    tmp = out.with_name(out.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    with temporary_distributed_context(backend="gloo"):
        bridge = auto_bridge(hf_dir=hf_dir)
        provider = build_provider(one_rank, bridge, stage_index)
        provider.bf16 = False
        provider.params_dtype = torch.float32
        provider.pipeline_dtype = torch.float32
        model = build_and_load_model(str(iter_dir), provider, use_cpu_init=True, skip_temp_dist_context=True)
        bridge.save_hf_pretrained(model, tmp, show_progress=False, weight_dtype=weight_dtype)
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


def export_run(run_dir: str | Path, out: str | Path | None = None, *, dtype: str | None = None) -> Path:
    """Export a megatron run directory: the latest checkpoint of its last trained stage → ``out``
    (default ``<run.dir>/hf``). Reads ``<run.dir>/config.yaml``; the HF init directory is
    ``<run.dir>/megatron/hf_init`` when training wrote one, else the configured model path."""
    from ...config.load import load_saved_config
    from .config import stage_checkpoint_dir
    from .model import resolve_model_dir

    run_dir = Path(run_dir)
    cfg = load_saved_config(run_dir / "config.yaml")
    stages = [i for i in range(len(cfg.stages))
              if (stage_checkpoint_dir(run_dir, cfg, i) / "latest_checkpointed_iteration.txt").is_file()]
    if not stages:
        raise FileNotFoundError(f"{run_dir}: no Megatron checkpoint under {run_dir / 'checkpoints'}")
    i = stages[-1]
    init = run_dir / "megatron" / "hf_init"
    hf_dir = init if (init / "config.json").is_file() else resolve_model_dir(cfg.model.path)
    return export_to_hf(cfg, stage_checkpoint_dir(run_dir, cfg, i), Path(out) if out else run_dir / "hf",
                        hf_dir=hf_dir, stage_index=i, dtype=dtype)


def is_megatron_run(path: str | Path) -> bool:
    """True for a Megatron-engine run directory (a stage save dir with ``latest_checkpointed_iteration.txt``)."""
    root = Path(path) / "checkpoints"
    return root.is_dir() and any(root.glob("*/latest_checkpointed_iteration.txt"))


def export_run_dir(run_dir: str | Path, out: str | Path, *, dtype: str = "float32", remote_code: bool = False,
                   eval_json: str | Path | None = None, overwrite: bool = False,
                   max_shard_size: str | int = "5GB") -> Path:
    """``nemodiff-export`` of a Megatron run directory: :func:`export_run` (AutoBridge, float32) into a
    temporary directory beside ``out``, then the package's own exporter on that HF directory, so a
    Megatron run gets the same layout, ``nemodiff`` record, remote code and model card as a torch run.
    """
    import tempfile

    from ...export import ExportError, export_checkpoint

    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:  # fail before the long conversion
        raise ExportError(f"output directory {out} is not empty (pass overwrite=true to replace it)")
    try:
        import megatron.bridge  # noqa: F401
    except Exception as e:  # not installed, or its CUDA-only imports fail on this machine
        raise ExportError(f"{run_dir} is a Megatron run: exporting it needs megatron-bridge importable "
                          f"(a NeMo container, or the CPU tier of scripts/install_megatron_cpu.sh with "
                          f"tools/megatron_shims.py); import failed: {type(e).__name__}: {e}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    if eval_json is None and (run_dir / "eval" / "eval.json").is_file():
        eval_json = run_dir / "eval" / "eval.json"
    with tempfile.TemporaryDirectory(prefix=".megatron-hf-", dir=out.parent) as tmp:
        try:
            hf = export_run(run_dir, Path(tmp) / "hf", dtype="float32")
        except FileNotFoundError as e:
            raise ExportError(f"{run_dir} is a Megatron run, but: {e}") from None
        return export_checkpoint(hf, out, dtype=dtype, remote_code=remote_code, eval_json=eval_json,
                                 overwrite=overwrite, max_shard_size=max_shard_size)
