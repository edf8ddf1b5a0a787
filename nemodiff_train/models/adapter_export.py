"""Load an adapter export (docs/adapters.md) for decoding: the recorded base + the drafter adapter.

The loading side of :mod:`nemodiff_train.export.adapter` (which writes these directories), kept in
``models/`` so that ``nemodiff-eval``, ``nemodiff-bench`` and the exporter all load an adapter export
the same way without importing one another (tests/unit/test_import_boundaries.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterExportError", "is_adapter_export", "load_adapter_export",
           "pick_base", "recorded_base"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterExportError(RuntimeError):
    """An adapter export that cannot be loaded (not one, its base missing, weights that do not fit the base).

    ``nemodiff-export`` reports it as an :class:`~nemodiff_train.export.errors.ExportError` with the same message.
    """


def is_adapter_export(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def recorded_base(export_dir: Path, adapter: dict) -> list[tuple[str, str | None]]:
    """Where an adapter export's base is: ``[(path or Hub id, revision)]`` in the order to try (the
    recorded directory, relative to ``export_dir``, then the Hub id at its recorded revision)."""
    out = []
    if adapter.get("base_path"):
        path = Path(str(adapter["base_path"])).expanduser()
        out.append((str(path if path.is_absolute() else (Path(export_dir) / path).resolve()), None))
    if adapter.get("base_hub_id"):
        out.append((str(adapter["base_hub_id"]), adapter.get("base_revision")))
    return out


def pick_base(candidates: list[tuple[str | None, str | None]]) -> Path:
    """The first ``(path or Hub id, revision)`` candidate that resolves to a local directory."""
    from ..assets.resolve import resolve_model_path

    errors = []
    for c, revision in [(c, r) for c, r in candidates if c]:
        try:
            return resolve_model_path(str(c), revision=revision)
        except FileNotFoundError as e:
            errors.append(str(e))
    raise AdapterExportError("the adapter's base model is not available: " + ("; ".join(errors) or "no base recorded")
                             + " (pass base=<path or Hub id>)")


def load_adapter_export(path: str | Path, *, base: str | None = None, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", attn_implementation: str | None = None):
    """Base (``base``, else the recorded path, else the recorded Hub id) + the adapter of an export.

    Returns:
        a :class:`~nemodiff_train.models.hf.DLMModel` with the adapter attached, the export's
        tokenizer and generation config, and the export's ``nemodiff`` record on its config.
    """
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, GenerationConfig

    from .adapter import load_peft_state_dict
    from .hf import _has_tokenizer, load_dlm

    path = Path(path)
    try:
        peft_config = json.loads((path / ADAPTER_CONFIG).read_text())
        record = dict(peft_config["nemodiff"])
        adapter = record["adapter"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise AdapterExportError(f"{path / ADAPTER_CONFIG} is not a nemodiff adapter export ({type(e).__name__}: {e})") from None
    base_dir = pick_base([(base, None)] if base else recorded_base(path, adapter))
    settings = {k: record[k] for k in ("train_block_size", "inference_block_size", "attention_pattern") if k in record}
    dlm = load_dlm(base_dir, mask_token=int(record["mask_token_id"]), untie_head=False, dtype=dtype,
                   attn_implementation=attn_implementation, device=device, settings=settings)
    dlm.add_adapter(rank=int(adapter["r"]), alpha=float(adapter["lora_alpha"]), dropout=0.0,
                    target_modules=tuple(adapter["target_modules"]))
    try:
        load_peft_state_dict(dlm.adapter, load_file(str(path / ADAPTER_WEIGHTS)))
    except ValueError as e:
        raise AdapterExportError(f"{path / ADAPTER_WEIGHTS} does not fit the base {base_dir}: {e}") from None
    dlm.adapter.to(device=device, dtype=dtype)
    if _has_tokenizer(path):
        dlm.tokenizer = AutoTokenizer.from_pretrained(path)
    if (path / "generation_config.json").is_file():
        dlm.hf.generation_config = GenerationConfig.from_pretrained(path)
    dlm.hf.config.nemodiff = record
    return dlm.eval()
