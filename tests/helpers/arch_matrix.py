"""The architecture matrix: tiny random configs of every tested decoder family, built in-process.

Each entry is ``name -> (model_type, config overrides)``. Windows are small (8 positions) and the test
sequences longer, so a wrongly applied (or ignored) sliding window changes the logits; Granite's
``logits_scaling`` and Gemma-2's soft-capping are far from 1 / large logits, so an ignored head
transform changes them too.
"""

from __future__ import annotations

from pathlib import Path

import torch

WINDOW = 8

ARCHS: dict[str, tuple[str, dict]] = {
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama_untied": ("llama", {"tie_word_embeddings": False}),
    "qwen2_window": ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    "qwen3": ("qwen3", {"head_dim": 8}),
    "mistral": ("mistral", {"sliding_window": None}),
    "mistral_window": ("mistral", {"sliding_window": WINDOW}),
    "phi3_window": ("phi3", {"sliding_window": WINDOW}),
    "olmo2": ("olmo2", {}),
    "granite": ("granite", {"logits_scaling": 8.0, "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                            "attention_multiplier": 0.25}),
    "gemma2": ("gemma2", {"head_dim": 8, "sliding_window": WINDOW, "final_logit_softcapping": 3.0,
                          "attn_logit_softcapping": 5.0, "query_pre_attn_scalar": 8}),
}
"""Every family and feature the README's supported-architecture table lists."""

WINDOWED = ("qwen2_window", "mistral_window", "phi3_window", "gemma2")


def arch_config(name: str, vocab_size: int = 96, **overrides):
    """A 2-layer config of matrix entry ``name`` (GQA: 4 query heads, 2 KV heads)."""
    from transformers import AutoConfig

    family, extra = ARCHS[name]
    kw = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(extra)
    kw.update(overrides)
    return AutoConfig.for_model(family, **kw)


def arch_model(name: str, seed: int = 0, attn_implementation: str | None = None, **overrides):
    """A random fp32 model of matrix entry ``name`` (eval mode); attention: the first of sdpa, eager it supports."""
    from transformers import AutoModelForCausalLM

    from nemodiff_train.models.arch import pick_attn_implementation

    config = arch_config(name, **overrides)
    attn = pick_attn_implementation(config, "cpu", attn_implementation)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.float().eval()


def save_arch_model(directory: Path, name: str, seed: int = 0, **overrides) -> Path:
    """``arch_model`` saved with the tiny tokenizer (vocabulary and special ids taken from it)."""
    from .tiny_tokenizer import make_tiny_tokenizer

    directory = Path(directory)
    tok = make_tiny_tokenizer(directory)
    model = arch_model(name, seed, vocab_size=len(tok), bos_token_id=None, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, **overrides)
    model.save_pretrained(directory)
    return directory
