"""Write a DLM as a Hugging Face directory of its base architecture, atomically.

The export is the base architecture's own layout (``model.safetensors``, or shards + an index
above ``max_shard_size``; ``config.json``, tokenizer files, ``generation_config.json``), so ``AutoModelForCausalLM.from_pretrained(out)`` loads
it with no remote code and computes the training model's causal logits. ``config.json`` records
the DLM settings and training provenance under ``nemodiff``, which is all
:func:`nemodiff_train.models.hf.load_dlm` needs. Optional extras: self-contained remote code
(``modeling_nemodiff.py``, :mod:`.remote_code`) and the model card (``README.md``, :mod:`.model_card`).

Stop tokens: ``generation_config.json`` lists the toolkit's whole stop set
(:func:`nemodiff_train.models.stop_tokens.stop_token_ids`: EOS and ``<|im_end|>``) as ``eos_token_id``
and each of those tokens is a special token of the saved tokenizer, so plain ``generate()`` and the
remote code's ``generate(mode=...)`` stop where ``nemodiff-eval`` stops.

Everything is written through :func:`.output_dir.atomic_directory`, so ``out`` is either the complete,
verified export or untouched.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .. import runs
from ..config.secrets import redact, scrub_env_values
from ..models.dtypes import DTYPES
from ..faults import fault_point
from .errors import ExportError
from .options import DEFAULT_MAX_SHARD_SIZE, dtype_name, shard_size
from .output_dir import atomic_directory, check_replaceable
from .provenance import public_record

log = logging.getLogger(__name__)

__all__ = ["export_dlm", "training_metadata", "nemodiff_record", "write_model_files", "package_version"]


def package_version() -> str:
    """This toolkit's version, recorded in every export and stamped into its remote code."""
    from .. import __version__

    return __version__


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _data_sources(stages: list[dict] | None) -> list[str]:
    seen: list[str] = []
    for s in stages or []:
        for src in s.get("sources") or []:
            if src not in seen:
                seen.append(src)
    return seen


def nemodiff_record(dlm, metadata: dict | None, dtype: str) -> dict[str, Any]:
    """The ``nemodiff`` dict of config.json: DLM settings (authoritative) + training provenance."""
    rec: dict[str, Any] = dict(getattr(dlm.hf.config, "nemodiff", None) or {})
    rec.update(metadata or {})
    rec.update(asdict(dlm.settings))
    rec.setdefault("alpha", None)
    rec.setdefault("beta", None)
    rec.setdefault("recipe", None)
    if not rec.get("data_sources"):
        rec["data_sources"] = _data_sources(rec.get("stages"))
    rec["nemodiff_version"] = package_version()
    rec["export_dtype"] = dtype
    # published: no absolute local path (.provenance), no credential key, no secret environment value
    return _json_safe(scrub_env_values(redact(public_record(rec))))


def training_metadata(cfg, step: int | None = None, tokens: int | None = None) -> dict[str, Any]:
    """Provenance for :func:`export_dlm` from a typed :class:`~nemodiff_train.config.schema.Config`.

    Args:
        cfg: the run's config.
        step, tokens: optimizer steps done and clean tokens consumed, when known.
    """
    from ..config.load import as_dict
    from .checkpoint import run_metadata

    meta = run_metadata({}, as_dict(cfg))
    if step is not None:
        meta["training_steps"] = int(step)
    if tokens is not None:
        meta["training_tokens"] = int(tokens)
    return meta


@torch.no_grad()
def _save_weights(hf, folder: Path, dtype: torch.dtype, max_shard_size: str | int) -> None:
    """``save_pretrained`` with every floating tensor cast to ``dtype`` on CPU (the model is left as it is)."""
    converted: dict[str, torch.Tensor] = {}
    shared: dict[tuple, torch.Tensor] = {}
    for key, t in hf.state_dict().items():
        ident = (t.device, t.data_ptr(), tuple(t.shape), t.dtype)
        if ident not in shared:  # tied tensors stay one tensor
            shared[ident] = t.detach().to(device="cpu", dtype=dtype if t.is_floating_point() else t.dtype)
        converted[key] = shared[ident]
    config_dtype = getattr(hf.config, "dtype", None)
    try:
        hf.save_pretrained(folder, state_dict=converted, max_shard_size=max_shard_size)
    finally:
        hf.config.dtype = config_dtype  # save_pretrained records the model's dtype on its config


def write_model_files(tmp: Path, dlm, record: dict, name: str, source: str | None, model_type: str | None,
                      rows) -> None:
    """What every export writes beside its weights: the remote code (when ``source``), ``config.json``
    with the nemodiff record, the tokenizer, the stop tokens and the model card."""
    from .model_card import write_model_card
    from .remote_code import MODELING_FILE, remote_class_name

    auto_map = None
    if source is not None:
        (tmp / MODELING_FILE).write_text(source)
        auto_map = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{remote_class_name(model_type)}"}
    _write_config(tmp, record, name, auto_map)
    if dlm.tokenizer is not None:
        dlm.tokenizer.save_pretrained(str(tmp))
    _write_stop_tokens(tmp, dlm)
    write_model_card(tmp, rows=rows, metadata=record)


def _write_config(folder: Path, record: dict, dtype: str, auto_map: dict | None) -> None:
    file = folder / "config.json"
    cfg = json.loads(file.read_text())
    cfg["dtype"] = dtype
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = dtype
    cfg["nemodiff"] = record
    if auto_map:
        cfg["auto_map"] = {**(cfg.get("auto_map") or {}), **auto_map}
    else:
        cfg.pop("auto_map", None)
    file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _write_stop_tokens(folder: Path, dlm) -> tuple[int, ...]:
    """Put the stop set into ``generation_config.json`` and the saved tokenizer's special tokens.

    ``_from_model_config`` is dropped: with it, transformers may rebuild the generation config from
    ``config.json`` (whose ``eos_token_id`` is the single EOS) and lose the list.
    Returns the stop ids written (``()`` when the model names none).
    """
    from ..models.stop_tokens import stop_token_ids

    tok = dlm.tokenizer
    stops = stop_token_ids(tok, getattr(dlm.hf, "generation_config", None))
    if not stops:
        return stops
    file = folder / "generation_config.json"
    gen = json.loads(file.read_text()) if file.is_file() else {}
    gen.pop("_from_model_config", None)
    gen["eos_token_id"] = list(stops)
    if gen.get("pad_token_id") is None:  # generate() needs one to pad finished rows of a batch
        gen["pad_token_id"] = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else stops[0]
    file.write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    if tok is not None:
        _mark_special(folder, stops)
    return stops


def _mark_special(folder: Path, ids: tuple[int, ...]) -> None:
    """Re-save the tokenizer in ``folder`` with every token of ``ids`` registered as special.

    Special means never split, skipped by ``decode(skip_special_tokens=True)``, and listed in
    ``all_special_ids``. The tokenizer of the live model is left as it is.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    vocab_size = len(tok)
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ExportError(f"stop token ids {bad} are outside the tokenizer's vocabulary ({vocab_size} tokens)")
    missing = [tok.convert_ids_to_tokens(i) for i in ids if i not in set(tok.all_special_ids)]
    if not missing:
        return
    tok.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    if len(tok) != vocab_size or any(i not in set(tok.all_special_ids) for i in ids):
        raise ExportError(f"could not register stop tokens {missing} as special tokens of the tokenizer")
    tok.save_pretrained(str(folder))


def _verify(folder: Path) -> None:
    """Every weight file the index names is there (a cheap guard against a partial save)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = set(json.loads(index.read_text())["weight_map"].values())
    else:
        files = {"model.safetensors"}
    missing = sorted(f for f in files if not (folder / f).is_file())
    if missing:
        raise ExportError(f"export incomplete: {missing} not written")


def export_dlm(dlm, out: str | Path, *, dtype: str = "float32", metadata: dict | None = None,
               remote_code: bool = False, eval_json: str | Path | None = None, overwrite: bool = False,
               max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, _protect: list[Path] = ()) -> Path:
    """Export a :class:`~nemodiff_train.models.hf.DLMModel` as a Hugging Face directory.

    Args:
        dlm: the model (single-device, unsharded; gather FSDP weights first or use
            :func:`export_checkpoint` on the saved checkpoint).
        out: the output directory (refused when it exists and is not empty, unless ``overwrite``).
        dtype: ``float32`` or ``bfloat16`` weights.
        metadata: training provenance recorded under ``config.json["nemodiff"]`` (recipe, stages,
            data_sources, alpha, beta, training_steps, training_tokens, base_model...); see
            :func:`training_metadata`.
        remote_code: add ``modeling_nemodiff.py`` (the four decoders behind ``generate(mode=...)``).
        eval_json: an evaluator ``eval.json`` whose table goes into the model card.
        max_shard_size: safetensors shard size (``"5GB"``, ``"200MB"``, or bytes).
    Returns:
        ``out``.
    Raises:
        ExportError: nothing is written to ``out`` then.
    """
    from .model_card import read_eval_rows
    from .remote_code import modeling_source

    out = Path(out)
    name = dtype_name(dtype)
    max_shard_size = shard_size(max_shard_size)
    check_replaceable(out, overwrite, _protect)
    rows = read_eval_rows(Path(eval_json)) if eval_json is not None else None
    record = nemodiff_record(dlm, metadata, name)
    model_type = getattr(dlm.hf.config, "model_type", None)
    source = modeling_source(model_type, package_version()) if remote_code else None  # fails before writing
    with atomic_directory(out, verify=_verify) as tmp:
        _save_weights(dlm.hf, tmp, DTYPES[name], max_shard_size)
        fault_point("export")  # NEMODIFF_FAULT=export:<n>: a fault with the weights half-exported
        write_model_files(tmp, dlm, record, name, source, model_type, rows)
    # debug: the CLIs (nemodiff-export, the trainer's export at the end) print their own one line
    log.debug("exported %s (%s%s)", out, name, ", remote code" if remote_code else "")
    return out
