"""Tiny random Hugging Face causal LMs of every supported family, built in-process for tests."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("qwen3", "llama", "qwen2", "mistral")


def tiny_config(family: str, vocab_size: int = 96, tie: bool = True, **overrides):
    """A 2-layer config of the given family (GQA: 4 query heads, 2 KV heads)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"qwen3": Qwen3Config, "llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[family]
    kw = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family in ("qwen3",):
        kw["head_dim"] = 8
    if family == "mistral":
        kw["sliding_window"] = None
    kw.update(overrides)
    return cls(**kw)


def tiny_model(family: str = "qwen3", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw), attn_implementation="sdpa")
    return model.float().eval()


def save_tiny_model(directory: Path, family: str = "qwen3", seed: int = 0, **kw) -> Path:
    model = tiny_model(family, seed, **kw)
    model.save_pretrained(directory)
    return Path(directory)
