"""Named model shapes for ``nemodiff-bench shape=...`` (random weights) and the bytes one forward streams.

``qwen3-8b`` and ``qwen3-1.7b`` are the Qwen3 configurations' shapes (PERFORMANCE figures in the README
use the 8B one); ``embedded`` is the shape of the package's tiny demo model (nemodiff_train/assets/).
Random weights make every forward cost what the real model's costs, but drafts are rarely accepted, so
their TPF says nothing about a trained model's: bench a model directory for that.
"""

from __future__ import annotations

import json

import torch

__all__ = ["SHAPES", "GPU_ONLY_SHAPES", "shape_config", "random_model", "weight_bytes", "kv_bytes",
           "default_bandwidth"]

_QWEN3 = dict(vocab_size=151936, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
              rms_norm_eps=1e-6, hidden_act="silu")
SHAPES: dict[str, dict] = {
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, tie_word_embeddings=False),
    "qwen3-1.7b": dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, tie_word_embeddings=True),
    "embedded": {},  # read from the packaged model's config.json
}
# 16 GB of bf16 weights: random init alone takes minutes on a CPU and the numbers mean nothing there
GPU_ONLY_SHAPES = frozenset({"qwen3-8b"})

# HBM bandwidth (TB/s) by device-name fragment: the vendors' figures (SXM parts)
_BANDWIDTH_TBPS = {"H200": 4.8, "H100": 3.35, "A100": 2.0, "B200": 8.0}


def shape_config(shape: str):
    """A transformers ``Qwen3Config`` of the named shape."""
    from transformers import Qwen3Config

    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r}: choose one of {sorted(SHAPES)}")
    if shape == "embedded":
        from ..assets import embedded_model_dir

        return Qwen3Config(**json.loads((embedded_model_dir() / "config.json").read_text()))
    return Qwen3Config(**SHAPES[shape])


def random_model(shape: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """``(hf_model, mask_token_id)``: a random model of ``shape`` built on ``device`` (mask = the last id)."""
    from transformers import AutoModelForCausalLM

    config = shape_config(shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), config.vocab_size - 1


def weight_bytes(model) -> int:
    """Bytes of the parameters (tied weights counted once): what every forward streams at least once."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes(config, batch: int, columns: int, element_size: int) -> int:
    """Bytes of K and V for ``batch`` rows of ``columns`` cached positions over all layers."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * columns * batch * element_size


def default_bandwidth(device: torch.device) -> float | None:
    """The HBM bandwidth in TB/s of a known GPU, else None (CPU, unknown parts: pass ``hbm_tbps=``)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in _BANDWIDTH_TBPS.items() if key in name), None)
