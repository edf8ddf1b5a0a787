"""Export and load a drafter adapter (docs/adapters.md): megabytes beside an untouched base model.

An adapter export is a directory of

* ``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's LoRA format (``peft_type: LORA``,
  ``r``, ``lora_alpha``, ``target_modules``, ``base_model_name_or_path``; weights named
  ``base_model.model.<module path>.lora_A.weight`` / ``lora_B.weight``), plus the mask token's trained
  input-embedding row under ``nemodiff.mask_embedding`` (a key peft does not know and ignores) and a
  ``nemodiff`` record: DLM settings, the base reference (a local path and/or a Hub id) and how the
  adapter is switched (per token: on for draft / denoise tokens, off for AR / verify / re-encode);
* ``config.json``: the base's config with the same ``nemodiff`` record (``adapter`` key) and, with
  ``remote_code``, an ``auto_map`` to ``modeling_nemodiff.py``, whose ``from_pretrained`` loads the
  base from the recorded reference and attaches the adapter, so
  ``AutoModelForCausalLM.from_pretrained(<adapter dir>, trust_remote_code=True)`` offers every mode;
* the tokenizer and ``generation_config.json`` (stop tokens, as a full export has them) and a model card.

No base weights are written: the base stays the checkpoint users already ship. Loading plain peft
(``PeftModel.from_pretrained``) applies the LoRA to every token (diffusion-only use, without the
trained mask row); only this package and the remote code switch it per token.

``merge=true`` (:func:`export_merged`) writes instead a full model with the adapter folded into the
weights: a diffusion-only checkpoint (its AR mode is no longer the base, so self-speculation is not
lossless against the base).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch

from .. import runs
from ..models.adapter_export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterExportError, pick_base
from .errors import ExportError

log = logging.getLogger(__name__)

__all__ = ["export_adapter", "export_merged", "is_adapter_run", "load_adapter_run"]

SWITCHING = "per token: on for draft and denoise tokens, off for AR steps, verify tokens and causal re-encodes"


def is_adapter_run(run_cfg: dict) -> bool:
    """A run config (plain dicts) that trained a drafter adapter."""
    return ((run_cfg.get("adapter") or {}).get("name") or "none") == "lora"


def _adapter_record(dlm, base_path: str | None, base_hub_id: str | None, base_revision: str | None) -> dict[str, Any]:
    a = dlm.adapter
    return {"kind": "lora", "base_path": base_path, "base_hub_id": base_hub_id, "base_revision": base_revision,
            "r": a.rank, "lora_alpha": a.alpha,
            "lora_dropout": a.dropout, "target_modules": list(a.target_modules), "module_paths": list(a.paths),
            "mask_embedding_key": "nemodiff.mask_embedding", "switching": SWITCHING,
            "trainable_parameters": a.trainable_parameters()}


def export_adapter(dlm, out: str | Path, *, base_path: str | None, base_hub_id: str | None = None,
                   base_revision: str | None = None, metadata: dict | None = None, dtype: str = "float32", remote_code: bool = True,
                   overwrite: bool = False, eval_json: str | Path | None = None) -> Path:
    """Write ``dlm``'s drafter adapter as an adapter export (see the module docstring).

    Args:
        dlm: a :class:`~nemodiff_train.models.hf.DLMModel` with an adapter attached.
        base_path, base_hub_id: where the base comes from (a directory, a Hub id); at least one. The
            directory is recorded relative to ``out`` (a Hub cache snapshot as its Hub id and commit),
            never as an absolute path (:mod:`.provenance`).
        base_revision: the Hub revision of ``base_hub_id`` the adapter was trained on (pins the download).
        remote_code: add ``modeling_nemodiff.py`` and the ``auto_map`` that loads base + adapter.
    Raises:
        ExportError: no adapter, no base reference, a non-empty ``out``; nothing is written then.
    """
    from safetensors.torch import save_file

    from ..models.adapter import peft_state_dict
    from .model_card import read_eval_rows
    from .provenance import hub_snapshot, public_reference, relative_base_path
    from .remote_code import modeling_source
    from ..models.dtypes import DTYPES
    from .output_dir import atomic_directory, check_replaceable
    from .options import dtype_name
    from .writer import nemodiff_record, package_version, write_model_files

    if dlm.adapter is None:
        raise ExportError("export_adapter: the model has no drafter adapter (adapter=lora)")
    if not (base_path or base_hub_id):
        raise ExportError("export_adapter: no base reference (a base path or a Hub id) to record")
    out = Path(out)
    name = dtype_name(dtype)
    check_replaceable(out, overwrite)
    rows = read_eval_rows(Path(eval_json)) if eval_json is not None else None
    record = nemodiff_record(dlm, metadata, name)
    snapshot = hub_snapshot(str(base_path)) if base_path else None
    if snapshot:  # a base downloaded from the Hub: its id and commit say more than a cache path
        base_hub_id, base_revision, base_path = base_hub_id or snapshot[0], base_revision or snapshot[1], None
    relative = relative_base_path(base_path, out)
    record["adapter"] = _adapter_record(dlm, relative, base_hub_id, base_revision)
    record["base_model"] = base_hub_id or public_reference(str(Path(base_path).resolve()))
    if base_revision:
        record["base_model_revision"] = base_revision
    model_type = getattr(dlm.hf.config, "model_type", None)
    source = modeling_source(model_type, package_version()) if remote_code else None
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_hub_id or relative,
        "revision": base_revision,
        "r": dlm.adapter.rank, "lora_alpha": dlm.adapter.alpha, "lora_dropout": dlm.adapter.dropout,
        "target_modules": list(dlm.adapter.target_modules), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "modules_to_save": None, "use_rslora": False, "use_dora": False,
        "nemodiff": record}
    with atomic_directory(out, verify=_verify_adapter) as tmp:
        tensors = {k: v.detach().to(device="cpu", dtype=DTYPES[name]).contiguous()
                   for k, v in peft_state_dict(dlm.adapter).items()}
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
        dlm.hf.config.save_pretrained(tmp)
        if getattr(dlm.hf, "generation_config", None) is not None:
            dlm.hf.generation_config.save_pretrained(tmp)
        write_model_files(tmp, dlm, record, name, source, model_type, rows)
    log.debug("exported adapter %s", out)
    return out


def _verify_adapter(folder: Path) -> None:
    """The files an adapter export cannot load without are there (a guard against a partial save)."""
    missing = [f for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, "config.json") if not (folder / f).is_file()]
    if missing:
        raise ExportError(f"adapter export incomplete: {missing} not written")


def export_merged(dlm, out: str | Path, **kwargs) -> Path:
    """A full export with the adapter folded into a COPY of the weights (diffusion-only use; see the
    module docstring); ``dlm`` is left as it is. ``kwargs`` as :func:`nemodiff_train.export.export_dlm`."""
    from transformers import AutoModelForCausalLM

    from ..models.adapter import attach_adapter, find_adapter, load_peft_state_dict, merge_adapter, peft_state_dict
    from ..models.hf import DLMModel
    from .checkpoint import _no_init
    from .writer import export_dlm

    a = dlm.adapter
    if a is None:
        raise ExportError("merge=true: the model has no drafter adapter to merge")
    with _no_init():
        hf = AutoModelForCausalLM.from_config(dlm.hf.config, dtype=torch.float32,
                                              attn_implementation=dlm.hf.config._attn_implementation)
    hf.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in dlm.hf.state_dict().items()})
    hf.generation_config = copy.deepcopy(dlm.hf.generation_config)
    attach_adapter(hf, a.mask_token_id, rank=a.rank, alpha=a.alpha, dropout=0.0, target_modules=a.target_modules)
    load_peft_state_dict(find_adapter(hf), peft_state_dict(a))
    merge_adapter(hf)
    meta = dict(kwargs.pop("metadata", None) or {})
    meta["merged_adapter"] = {"lossless_against_base": False, "note": "adapter folded into every token's weights: "
                              "for diffusion decoding; use the adapter export for lossless self-speculation"}
    return export_dlm(DLMModel(hf, dlm.settings, dlm.tokenizer), out, metadata=meta, **kwargs)


def load_adapter_run(src, run_cfg: dict):
    """The base + the adapter of a torch run's checkpoint (``src``: a run or checkpoint
    :class:`~nemodiff_train.export.checkpoint.Source`).

    Returns:
        ``(dlm, base_path, base_hub_id, base_revision)``.
    """
    from transformers import AutoTokenizer, GenerationConfig

    from ..models.hf import _has_tokenizer, load_dlm
    from ..runs.dcp import load_dcp

    model_cfg, diff, a = run_cfg.get("model") or {}, run_cfg.get("diffusion") or {}, run_cfg.get("adapter") or {}
    source_file = src.hf_dir / "SOURCE"
    recorded = source_file.read_text().strip() if source_file.is_file() else None
    try:
        base_dir = pick_base([(recorded, None), (model_cfg.get("path"), model_cfg.get("revision"))])
    except AdapterExportError as e:
        raise ExportError(str(e)) from None
    hub_id = model_cfg.get("hub_id") or (model_cfg.get("path") if str(model_cfg.get("path", "")).count("/") == 1
                                         and not Path(str(model_cfg.get("path"))).exists() else None)
    nemodiff = json.loads((src.hf_dir / "config.json").read_text()).get("nemodiff") or {}
    mask = nemodiff.get("mask_token_id", model_cfg.get("mask_token_id"))
    dlm = load_dlm(base_dir, mask_token=int(mask) if mask is not None else model_cfg.get("mask_token"),
                   untie_head=False,
                   settings={"train_block_size": diff.get("block_size", 64),
                             "inference_block_size": diff.get("inference_block_size", 32),
                             "attention_pattern": diff.get("pattern", "two_stream")})
    dlm.add_adapter(rank=int(a.get("rank", 16)), alpha=float(a.get("alpha", 32.0)), dropout=0.0,
                    target_modules=tuple(a.get("target_modules") or ()))
    state = dlm.adapter.state_dict()
    try:
        load_dcp({"model": state}, src.ckpt_dir, no_dist=True)  # tensors only under model.
    except Exception as e:
        lines = str(e).strip().splitlines()
        raise ExportError(f"checkpoint {src.ckpt_dir}: cannot load the adapter weights "
                          f"({type(e).__name__}: {lines[-1] if lines else ''})") from None
    dlm.adapter.load_state_dict(state)
    if _has_tokenizer(src.hf_dir):
        dlm.tokenizer = AutoTokenizer.from_pretrained(src.hf_dir)
    if (src.hf_dir / "generation_config.json").is_file():
        dlm.hf.generation_config = GenerationConfig.from_pretrained(src.hf_dir)
    dlm.hf.config.nemodiff = nemodiff
    return dlm.eval(), str(Path(base_dir).resolve()), hub_id, model_cfg.get("revision")
