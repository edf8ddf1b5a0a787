"""Loading a model for decoding, shared by ``nemodiff-eval``, the lm-eval plugin and ``nemodiff-bench``.

Accepts a Hugging Face directory, an adapter export (:mod:`.adapter_export`) or a training run
directory (``config.yaml`` + ``hf/``), picks the device and dtype, and collects every id that should
end generation (:mod:`.stop_tokens`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .. import runs
from .dtypes import DTYPES
from .stop_tokens import stop_token_ids

log = logging.getLogger(__name__)

__all__ = ["resolve_model_dir", "pick_device", "pick_dtype", "load_dlm_for_decoding", "load_for_decoding"]


def resolve_model_dir(path: str | Path) -> Path:
    """The HF directory to load: ``path`` itself, or ``path/hf`` for a training run directory.

    Raises:
        FileNotFoundError: with what to do, when neither layout is found.
    """
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / runs.CONFIG_FILE).is_file():
        export = path / runs.EXPORT_DIR
        if (export / "config.json").is_file():
            return export
        raise FileNotFoundError(
            f"{path} is a training run directory without an exported model in {export}; export it first: "
            f"nemodiff-export checkpoint={path} out={export}")
    raise FileNotFoundError(f"{path} is neither a Hugging Face model directory (config.json) nor a training run "
                            "directory (config.yaml + hf/)")


def pick_device(device: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def pick_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_dlm_for_decoding(hf_dir: Path, dtype: torch.dtype, device: torch.device, attn_implementation: str):
    """A full export or an adapter export (its base + the adapter, switched per pass by the decoders), in eval mode."""
    from .adapter_export import is_adapter_export, load_adapter_export
    from .hf import load_dlm

    if is_adapter_export(hf_dir):
        dlm = load_adapter_export(hf_dir, dtype=dtype, device=device, attn_implementation=attn_implementation)
    else:
        dlm = load_dlm(hf_dir, dtype=dtype, device=device, attn_implementation=attn_implementation)
    return dlm.eval()


def load_for_decoding(model: str | Path, dtype: str = "float32", device: str = "auto",
                      attn_implementation: str | None = None):
    """Load a DLM for decoding.

    Args:
        attn_implementation: sdpa, eager or flex_attention; None = sdpa when the architecture supports
            it, else eager (Gemma-2). The decoders' masks reach each in the form it reads
            (:mod:`nemodiff_train.models.attention`).

    Returns:
        ``(dlm, cached_lm, eos_ids, hf_dir)``: the :class:`~nemodiff_train.models.hf.DLMModel`, its
        :class:`~nemodiff_train.models.cached.HFCachedLM`, the EOS ids and the directory loaded.
    """
    from transformers import AutoConfig

    from .arch import pick_attn_implementation
    from .cached import HFCachedLM

    hf_dir = resolve_model_dir(model)
    dev = pick_device(device)
    if dev.type == "cuda":
        # cuDNN's SDPA backend builds a graph per new (query, key) shape; decoding changes the key
        # length every step, so in bf16 those builds dominated (H200, tiny model: 24 tok/s on the
        # first pass, 330-420 tok/s with cuDNN SDPA off, the same outputs). Flash/efficient/math remain.
        torch.backends.cuda.enable_cudnn_sdp(False)
    # sdpa where the architecture has it (decoding masks change shape every call, which suits a dense
    # mask better than a BlockMask rebuilt per call), else eager; never a hard-coded kernel.
    attn = pick_attn_implementation(AutoConfig.from_pretrained(hf_dir), dev.type, attn_implementation, training=False)
    dlm = load_dlm_for_decoding(hf_dir, pick_dtype(dtype), dev, attn)
    if dlm.tokenizer is None:
        raise ValueError(f"{hf_dir} has no tokenizer files; evaluation needs one to render prompts and decode outputs")
    eos = stop_token_ids(dlm.tokenizer, getattr(dlm.hf, "generation_config", None))
    log.info("loaded %s on %s (%s); eos ids %s; mask id %d", hf_dir, dev, dtype, eos, dlm.settings.mask_token_id)
    return dlm, HFCachedLM(dlm), eos, hf_dir
