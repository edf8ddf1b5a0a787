"""The teacher of a distill set: the untouched base (loaded here) or a model the caller already holds.

* :func:`load_base_teacher` loads ``model.path`` (resolved like the trainer resolves the base:
  ``embedded``, a directory or a Hub name) with ``AutoModelForCausalLM``, float32, on the CPU by
  default; :func:`base_teacher_identity` names it for the fingerprint by its path and a sha256 of
  its config and weight files, without loading it.
* :func:`cached_lm` gives the decoders' :class:`~nemodiff_train.decoding.interface.CachedLM` view of
  any teacher: a DLM's AR mode (its mask token banned, as ``nemodiff-eval`` decodes AR) or a bare HF
  causal LM (with nothing banned, so greedy decoding equals its ``generate()``).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path

__all__ = ["load_base_teacher", "base_teacher_identity", "base_generation_config", "cached_lm", "inference_mode"]

_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")


def base_teacher_identity(model_path: str) -> dict:
    """``{"kind": "base", "path", "config_sha256", "weights_sha256"}`` of ``model.path`` (files hashed, not loaded)."""
    from ..assets.resolve import resolve_model_path

    root = resolve_model_path(model_path)

    def digest(paths) -> str:
        h = hashlib.sha256()
        for p in sorted(paths):
            h.update(p.name.encode() + b"\0")
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 23), b""):
                    h.update(block)
        return h.hexdigest()

    weights = sorted({p for pat in _WEIGHT_PATTERNS for p in root.glob(pat) if p.is_file()})
    configs = [p for p in (root / "config.json", root / "generation_config.json") if p.is_file()]
    return {"kind": "base", "path": model_path, "config_sha256": digest(configs), "weights_sha256": digest(weights)}


def load_base_teacher(model_path: str, device: str = "cpu"):
    """The untouched base at ``model_path`` as a float32 HF causal LM in eval mode on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..assets.resolve import resolve_model_path

    root = resolve_model_path(model_path)
    model = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32, attn_implementation="sdpa")
    return model.to(device).eval()


def base_generation_config(model_path: str):
    """The base's ``GenerationConfig`` (its ``eos_token_id`` joins the stop set), or None when it has none."""
    from transformers import GenerationConfig

    from ..assets.resolve import resolve_model_path

    root = Path(resolve_model_path(model_path))
    return GenerationConfig.from_pretrained(root) if (root / "generation_config.json").is_file() else None




class _WithoutMask:
    """A bare AR base has no mask token, yet the decoders ban one: an extra never-chosen column stands in.

    Logits ``[b, q, V]`` become ``[b, q, V + 1]`` with column V at -inf and ``mask_token_id = V``, so the
    base's own distribution over its V tokens is untouched (greedy equals its ``generate()``).
    """

    def __init__(self, lm):
        self._lm = lm
        self.mask_token_id = int(lm.vocab_size)
        self.vocab_size = int(lm.vocab_size) + 1

    def __getattr__(self, name):
        return getattr(self._lm, name)

    def forward(self, *args, **kwargs):
        import torch

        logits = self._lm.forward(*args, **kwargs)
        return torch.cat([logits, logits.new_full((*logits.shape[:-1], 1), float("-inf"))], dim=-1)


def cached_lm(model):
    """The decoders' view of ``model``: a CachedLM as is, a DLMModel's AR mode, or a bare HF causal LM."""
    from ..models.cached import HFCachedLM

    model = getattr(model, "module", model)  # DDP
    if all(hasattr(model, a) for a in ("new_cache", "forward", "mask_token_id")):
        return model
    if hasattr(model, "hf") and hasattr(model, "settings"):
        return HFCachedLM(model)
    return _WithoutMask(HFCachedLM(model, mask_token_id=0))


@contextmanager
def inference_mode(model):
    """Eval mode (no dropout) while generating; the module's previous mode restored afterwards."""
    module = getattr(getattr(model, "module", model), "hf", getattr(model, "module", model))
    was = getattr(module, "training", None)
    if was is not None:
        module.eval()
    try:
        yield
    finally:
        if was:
            module.train()
