"""Find, check and load what an export starts from: a run directory, a checkpoint or an HF directory.

A training run directory (``config.yaml``, ``hf_base/``, ``checkpoints/step_XXXXXXXX/``) resolves to
its latest complete checkpoint. A checkpoint is the DCP save of ``{"model": <HF-layout state dict>,
...}`` plus a ``COMPLETE`` marker and ``trainer_state.json`` (the layout is :mod:`nemodiff_train.runs`'s);
``hf_base/`` holds the architecture it belongs to (config with the DLM settings under ``nemodiff``,
tokenizer, generation config, no weights). Every check runs before a byte of the export is written,
and every failure names the file or key at fault.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import runs
from ..runs import COMPLETE, DCP_METADATA, TRAINER_STATE, step_of
from .errors import ExportError

log = logging.getLogger(__name__)

__all__ = ["Source", "resolve_source", "load_source", "run_metadata", "checkpoint_metadata", "read_dcp_metadata"]



@dataclass
class Source:
    """What ``checkpoint=`` pointed at.

    Attributes:
        kind: ``run`` (run directory), ``checkpoint`` (one checkpoint directory) or ``hf`` (HF directory).
        hf_dir: the HF directory with config + tokenizer (``<run>/hf_base`` for run/checkpoint sources).
        ckpt_dir: the checkpoint directory (run/checkpoint sources).
        run_dir: the run directory, when known.
    """

    kind: str
    hf_dir: Path
    ckpt_dir: Path | None = None
    run_dir: Path | None = None


def resolve_source(path: str | Path) -> Source:
    """Classify ``path`` and find the checkpoint and HF directory it implies.

    Raises:
        ExportError: the path does not exist, a run has no complete checkpoint, a checkpoint lacks its
            ``COMPLETE`` marker, or the run has no ``hf_base/config.json``.
    """
    path = Path(path)
    if not path.exists():
        raise ExportError(f"checkpoint path {path} does not exist")
    if not path.is_dir():
        raise ExportError(f"checkpoint path {path} is not a directory (give a run directory, a "
                          "checkpoints/step_XXXXXXXX directory or a Hugging Face model directory)")
    is_ckpt = step_of(path) is not None or (path / DCP_METADATA).exists() or path.name.startswith("step_")
    if (path / "config.json").is_file() and not is_ckpt:
        return Source("hf", hf_dir=path)
    if is_ckpt:
        if not (path / COMPLETE).is_file():
            raise ExportError(f"incomplete checkpoint {path}: no {COMPLETE} marker (the save was interrupted "
                              "or is still running); export a complete checkpoint or the run directory")
        run_dir = path.parent.parent if path.parent.name == runs.CHECKPOINTS_DIR else None
        return Source("checkpoint", hf_dir=_hf_base(run_dir, path), ckpt_dir=path, run_dir=run_dir)
    if (path / runs.CHECKPOINTS_DIR).is_dir() or (path / runs.HF_BASE_DIR).is_dir() or \
            (path / runs.CONFIG_FILE).is_file():
        ckpt = runs.latest_checkpoint(path)
        if ckpt is None:
            root = path / runs.CHECKPOINTS_DIR
            partial = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
            detail = f" (present but incomplete: {', '.join(partial)})" if partial else ""
            raise ExportError(f"run directory {path} has no complete checkpoint in {root}{detail}")
        return Source("run", hf_dir=_hf_base(path, ckpt), ckpt_dir=ckpt, run_dir=path)
    raise ExportError(f"{path} is neither a Hugging Face model directory (config.json), a training run directory "
                      "(config.yaml, hf_base/, checkpoints/) nor a checkpoint directory (step_XXXXXXXX with COMPLETE)")


def _hf_base(run_dir: Path | None, ckpt: Path) -> Path:
    if run_dir is None:
        raise ExportError(f"checkpoint {ckpt} is not inside <run dir>/checkpoints/, so its architecture "
                          "(<run dir>/hf_base) cannot be found")
    base = run_dir / runs.HF_BASE_DIR
    if not (base / "config.json").is_file():
        raise ExportError(f"{base / 'config.json'} is missing: the run directory must hold the architecture the "
                          "checkpoint belongs to (written by the trainer at start)")
    return base


# ----------------------------------------------------------------------------------------------
# DCP checks


def read_dcp_metadata(ckpt: Path):
    """The DCP ``Metadata`` of a checkpoint (tensor sizes and where each one is stored)."""
    from ..runs.dcp import SafeFileSystemReader, UnsafeCheckpointError  # .metadata is a pickle: exact classes

    file = ckpt / DCP_METADATA
    if not file.is_file():
        raise ExportError(f"checkpoint file {file} is missing: {ckpt} is not a readable DCP checkpoint")
    try:
        return SafeFileSystemReader(str(ckpt)).read_metadata()
    except UnsafeCheckpointError as e:  # a hostile file: say so, not "unreadable"
        raise ExportError(f"checkpoint {ckpt}: {e}") from None
    except Exception as e:  # pickle / EOF / attribute errors of a garbled file
        raise ExportError(f"checkpoint file {file} is unreadable ({type(e).__name__}: {e})") from None


def _tie_groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """State-dict key → every key sharing its storage (tied weights), itself included."""
    by_ptr: dict[tuple, list[str]] = {}
    for k, v in model.state_dict().items():
        by_ptr.setdefault((v.device, v.data_ptr(), tuple(v.shape)), []).append(k)
    return {k: keys for keys in by_ptr.values() for k in keys}


def _check_against_model(ckpt: Path, md, model: torch.nn.Module, hf_dir: Path) -> list[str]:
    """Compare checkpoint tensor names/shapes with the model built from ``hf_dir``; returns the keys to load."""
    saved = {k[len("model."):]: v for k, v in md.state_dict_metadata.items() if k.startswith("model.")}
    if not saved:
        raise ExportError(f"checkpoint {ckpt} has no 'model' entry ({ckpt / DCP_METADATA} lists "
                          f"{sorted({k.split('.')[0] for k in md.state_dict_metadata})})")
    expected = model.state_dict()
    ties = _tie_groups(model)
    config = hf_dir / "config.json"
    for key, tensor in expected.items():
        if key in saved:
            size = getattr(saved[key], "size", None)
            if size is None:
                raise ExportError(f"checkpoint {ckpt}: model key {key!r} is not a tensor")
            if tuple(size) != tuple(tensor.shape):
                raise ExportError(f"checkpoint {ckpt}: weight {key!r} has shape {tuple(size)} but the architecture "
                                  f"in {config} needs {tuple(tensor.shape)}")
        elif not any(t in saved for t in ties.get(key, [])):
            raise ExportError(f"checkpoint {ckpt}: weight {key!r} is missing (the architecture in {config} needs it)")
    extra = sorted(set(saved) - set(expected))
    if extra:
        raise ExportError(f"checkpoint {ckpt}: weight {extra[0]!r} is not part of the architecture in {config}"
                          + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    _check_files(ckpt, md)
    return [k for k in expected if k in saved]


def _check_files(ckpt: Path, md) -> None:
    """Every storage file the model entry refers to exists and is long enough."""
    sizes: dict[str, int] = {}
    for index, info in md.storage_data.items():
        if not index.fqn.startswith("model."):
            continue
        file = ckpt / info.relative_path
        if info.relative_path not in sizes:
            if not file.is_file():
                raise ExportError(f"checkpoint file {file} is missing (it stores {index.fqn[len('model.'):]!r})")
            sizes[info.relative_path] = file.stat().st_size
        if sizes[info.relative_path] < info.offset + info.length:
            raise ExportError(f"checkpoint file {file} is truncated: {sizes[info.relative_path]} bytes, but "
                              f"{index.fqn[len('model.'):]!r} is stored up to byte {info.offset + info.length}")


def _diagnose_unreadable(ckpt: Path, md) -> str | None:
    """After a failed load, find the first stored tensor that does not deserialize: 'file (key)'."""
    for index, info in md.storage_data.items():
        if not index.fqn.startswith("model.") or getattr(info, "transform_descriptors", None):
            continue
        file = ckpt / info.relative_path
        try:
            with open(file, "rb") as f:
                f.seek(info.offset)
                torch.load(io.BytesIO(f.read(info.length)), weights_only=True, map_location="cpu")
        except Exception as e:
            key = index.fqn[len("model."):]
            return f"checkpoint file {file} is garbled: {key!r} cannot be read ({type(e).__name__})"
    return None


def _first_line(e: BaseException) -> str:
    """``Type: message`` of an exception, first line only (DCP embeds whole remote tracebacks)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def _load_weights(ckpt: Path, md, model: torch.nn.Module, keys: list[str]) -> None:
    from torch.distributed.checkpoint.api import CheckpointException

    from ..runs.dcp import UnsafeCheckpointError, load_dcp

    sd = model.state_dict()
    wanted = {k: sd[k] for k in keys}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*single process.*")  # no process group: expected
            # no_dist: export runs in one process, even on rank 0 of a live process group (end of training)
            load_dcp({"model": wanted}, ckpt, no_dist=True)
    except UnsafeCheckpointError as e:
        raise ExportError(f"checkpoint {ckpt}: {e}") from None
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException; also RuntimeError...
        e = _first_line(e)
        raise ExportError(_diagnose_unreadable(ckpt, md) or
                          f"checkpoint {ckpt}: cannot load the model weights ({e})") from None
    missing, unexpected = model.load_state_dict(wanted, strict=False)
    ties = _tie_groups(model)
    really_missing = [k for k in missing if not any(t in wanted for t in ties.get(k, []))]
    if really_missing or unexpected:
        raise ExportError(f"checkpoint {ckpt}: weights {really_missing or unexpected} did not load")
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ExportError(f"checkpoint {ckpt}: weight {name!r} holds NaN/inf values (garbled or diverged)")


# ----------------------------------------------------------------------------------------------
# building the DLM


def _no_init():
    """Build the architecture without random initialisation (every weight is loaded next)."""
    from transformers.initialization import no_init_weights

    return no_init_weights()


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{file} is unreadable ({type(e).__name__}: {e})") from None


def _run_config(run_dir: Path | None) -> dict:
    """The run's resolved ``config.yaml`` as plain dicts ({} when absent); validated when it can be."""
    if run_dir is None or not (run_dir / runs.CONFIG_FILE).is_file():
        return {}
    file = run_dir / runs.CONFIG_FILE
    try:
        from ..config.load import as_dict, load_saved_config

        return as_dict(load_saved_config(file))
    except Exception as e:  # an older schema: read what we need without validation
        log.warning("%s does not validate against the current schema (%s); reading it as plain YAML", file, e)
        import yaml

        try:
            return yaml.safe_load(file.read_text()) or {}
        except (OSError, yaml.YAMLError) as e2:
            raise ExportError(f"{file} is unreadable ({e2})") from None


def _mask_token_id(nemodiff: dict, run_cfg: dict, tokenizer, hf_dir: Path, vocab_rows: int) -> int:
    mask_id = nemodiff.get("mask_token_id")
    model_cfg = run_cfg.get("model") or {}
    if mask_id is None:
        mask_id = model_cfg.get("mask_token_id")
    if mask_id is None and tokenizer is not None:
        name = model_cfg.get("mask_token") or "<|mask|>"
        tid = tokenizer.convert_tokens_to_ids(name)
        if tid is not None and tid != tokenizer.unk_token_id:
            mask_id = tid
    if mask_id is None:
        raise ExportError(f"no mask token: {hf_dir / 'config.json'} has no 'nemodiff.mask_token_id' and neither the "
                          "run config nor the tokenizer names one")
    if not 0 <= int(mask_id) < vocab_rows:
        raise ExportError(f"mask token id {mask_id} (from {hf_dir / 'config.json'}) is outside the model's "
                          f"{vocab_rows} embedding rows: the mask token is missing from the architecture")
    return int(mask_id)


def load_source(src: Source):
    """Build the DLM a source describes, loading and checking its weights.

    Returns:
        ``(dlm, metadata)``: the :class:`~nemodiff_train.models.hf.DLMModel` (fp32, CPU) and the
        training metadata known for it (recipe, data, steps, tokens...).
    """
    from ..models.hf import DLMModel, DLMSettings, _has_tokenizer, load_dlm

    if src.kind == "hf":
        try:
            dlm = load_dlm(src.hf_dir, dtype=torch.float32, device="cpu")  # attention: what the architecture supports
        except Exception as e:
            raise ExportError(f"cannot load the Hugging Face model in {src.hf_dir}: {type(e).__name__}: {e}") from None
        return dlm, dict(getattr(dlm.hf.config, "nemodiff", None) or {})

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from ..models.arch import pick_attn_implementation

    assert src.ckpt_dir is not None
    run_cfg = _run_config(src.run_dir)
    md = read_dcp_metadata(src.ckpt_dir)
    try:
        config = AutoConfig.from_pretrained(src.hf_dir)
    except Exception as e:
        raise ExportError(f"{src.hf_dir / 'config.json'} is not a valid model config "
                          f"({type(e).__name__}: {e})") from None
    try:  # not a hard-coded sdpa: some architectures support only eager (Gemma-2)
        attn = pick_attn_implementation(config, "cpu")
    except ValueError as e:
        raise ExportError(f"{src.hf_dir / 'config.json'}: {e}") from None
    with _no_init():
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    hf.eval()
    keys = _check_against_model(src.ckpt_dir, md, hf, src.hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(src.hf_dir) if _has_tokenizer(src.hf_dir) else None
    nemodiff = dict(getattr(config, "nemodiff", None) or {})
    mask_id = _mask_token_id(nemodiff, run_cfg, tokenizer, src.hf_dir, hf.get_input_embeddings().weight.shape[0])
    _load_weights(src.ckpt_dir, md, hf, keys)
    if (src.hf_dir / "generation_config.json").is_file():
        hf.generation_config = GenerationConfig.from_pretrained(src.hf_dir)
    diff = run_cfg.get("diffusion") or {}
    settings = DLMSettings(
        mask_token_id=mask_id,
        train_block_size=int(nemodiff.get("train_block_size", diff.get("block_size", 64))),
        inference_block_size=int(nemodiff.get("inference_block_size", diff.get("inference_block_size", 32))),
        attention_pattern=str(nemodiff.get("attention_pattern", diff.get("pattern", "two_stream"))))
    metadata = checkpoint_metadata(src, nemodiff, run_cfg)
    return DLMModel(hf, settings, tokenizer), metadata


def run_metadata(nemodiff: dict, run_cfg: dict) -> dict[str, Any]:
    """Provenance from hf_base's ``nemodiff`` dict, completed from the run's config (plain dicts)."""
    meta: dict[str, Any] = dict(nemodiff)
    diff = run_cfg.get("diffusion") or {}
    for key, cfg_key in (("alpha", "alpha"), ("beta", "beta"), ("noise_schedule", "schedule")):
        if key not in meta and cfg_key in diff:
            meta[key] = diff[cfg_key]
    if not meta.get("recipe"):
        meta["recipe"] = run_cfg.get("recipe") or (run_cfg.get("run") or {}).get("name")
    model_cfg = run_cfg.get("model") or {}
    if not meta.get("base_model") and model_cfg:
        meta["base_model"] = model_cfg.get("hub_id") or model_cfg.get("path")
    if not meta.get("base_model_revision") and model_cfg.get("revision"):
        meta["base_model_revision"] = model_cfg["revision"]
    if "stages" not in meta and run_cfg.get("stages"):
        meta["stages"] = [runs.stage_record(s.get("name"), s.get("kind"), s.get("steps"),
                                            (s.get("data") or {}).get("sources"), (s.get("data") or {}).get("seq_len"),
                                            s.get("global_batch_size")) for s in run_cfg["stages"]]
    return meta


def checkpoint_metadata(src: Source, nemodiff: dict, run_cfg: dict) -> dict[str, Any]:
    """:func:`run_metadata` plus the checkpoint's step and tokens (``trainer_state.json``, else its name)."""
    meta = run_metadata(nemodiff, run_cfg)
    if src.ckpt_dir is not None:
        meta["checkpoint"] = src.ckpt_dir.name
        state_file = src.ckpt_dir / TRAINER_STATE
        state = _read_json(state_file) if state_file.is_file() else {}
        step = state.get("step")
        if step is None:
            step = step_of(src.ckpt_dir)
        if step is not None:
            meta["training_steps"] = int(step)
        if state.get("tokens") is not None:
            meta["training_tokens"] = int(state["tokens"])
        elif step is not None and meta.get("stages"):
            meta["training_tokens"] = _tokens_from_stages(meta["stages"], int(step))
    return meta


def _tokens_from_stages(stages: list[dict], step: int) -> int | None:
    """Clean tokens consumed after ``step`` optimizer steps: Σ steps × global batch × seq_len, stage by stage."""
    total, left = 0, step
    for s in stages:
        if None in (s.get("steps"), s.get("global_batch_size"), s.get("seq_len")):
            return None
        done = min(left, int(s["steps"]))
        total += done * int(s["global_batch_size"]) * int(s["seq_len"])
        left -= done
    return total
