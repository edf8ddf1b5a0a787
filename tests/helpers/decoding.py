"""Helpers for decoder tests: tiny HF models behind ``HFCachedLM``, a scripted pure-torch ``CachedLM``,
and a reference KV cache from one causal pass."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from .tiny_models import tiny_model

MASK_ID = 3
VOCAB = 96


@pytest.fixture(autouse=True)
def one_thread():
    """Import into a test module to run it single-threaded: tiny matmuls gain nothing from threads and
    lose a lot to contention on shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_lm(family: str = "qwen3", seed: int = 0, **kw):
    """A tiny random fp32 HF model as a :class:`CachedLM` (mask id 3).

    ``tie=False`` gives varied outputs; ``initializer_range=0.1`` repetitive ones that drafts often
    match; the default (tied, 0.02) repeats the last prompt token forever.
    """
    from nemodiff_train.models.cached import HFCachedLM

    return HFCachedLM(tiny_model(family, seed, **kw), mask_token_id=MASK_ID)


def random_prompts(seed: int, n: int, min_len: int = 1, max_len: int = 12) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, VOCAB) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]


@torch.inference_mode()
def reference_cache(lm, tokens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) ``[1, h, L, d]`` of ONE causal pass over ``tokens`` (positions 0..L-1)."""
    cache = lm.new_cache(1)
    n = len(tokens)
    lm.forward(cache, torch.tensor([tokens]), torch.arange(n)[None],
               torch.ones(n, n, dtype=torch.bool).tril()[None], write_cache=True)
    return [(k.clone(), v.clone()) for k, v in lm.cache_tensors(cache)]


@dataclass
class Call:
    """One forward as the scripted model saw it."""

    index: int
    input_ids: torch.Tensor      # [b, q]
    position_ids: torch.Tensor   # [b, q]
    attention_mask: torch.Tensor  # [b, q, C + q]
    write_cache: bool
    cache_length: int


class ScriptedLM:
    """A pure-torch :class:`CachedLM` whose logits come from ``script(call) -> [b, q, V]``.

    The "KV cache" stores, per position, the token id as key and the RoPE position as value
    (``[b, 1, C, 1]``), so tests can read exactly what a decoder cached. Every call is recorded.
    """

    def __init__(self, script: Callable[[Call], torch.Tensor], vocab_size: int = 32, mask_token_id: int = 1):
        self.script = script
        self.vocab_size = vocab_size
        self.mask_token_id = mask_token_id
        self.calls: list[Call] = []

    def new_cache(self, batch_size: int):
        return {"k": torch.zeros(batch_size, 1, 0, 1), "v": torch.zeros(batch_size, 1, 0, 1)}

    def cache_length(self, cache) -> int:
        return cache["k"].shape[2]

    def forward(self, cache, input_ids, position_ids, attention_mask, write_cache):
        b, q = input_ids.shape
        C = self.cache_length(cache)
        assert attention_mask.shape == (b, q, C + q) and attention_mask.dtype == torch.bool
        assert attention_mask.any(dim=-1).all(), "a query row attends to nothing (NaN softmax)"
        call = Call(len(self.calls), input_ids.clone(), position_ids.clone(), attention_mask.clone(), write_cache, C)
        self.calls.append(call)
        if write_cache:
            cache["k"] = torch.cat([cache["k"], input_ids[:, None, :, None].float()], dim=2)
            cache["v"] = torch.cat([cache["v"], position_ids[:, None, :, None].float()], dim=2)
        logits = self.script(call)
        assert logits.shape == (b, q, self.vocab_size)
        return logits

    def keep_cache(self, cache, positions):
        if positions.dim() == 1:  # every row
            positions = positions[None].expand(cache["k"].shape[0], -1)
        index = positions[:, None, :, None]  # [b, 1, n, 1] per row (batched self-speculation)
        cache["k"] = cache["k"].gather(2, index)
        cache["v"] = cache["v"].gather(2, index)

    def cache_tensors(self, cache):
        return [(cache["k"], cache["v"])]


def peaked_logits(vocab: int, token: int, conf: float, mask_id: int) -> torch.Tensor:
    """``[V]`` logits whose softmax with the mask column banned gives ``token`` probability ``conf``
    (the rest spread evenly); the mask column gets the LARGEST logit, so only a ban keeps it out."""
    p = torch.full((vocab,), (1.0 - conf) / (vocab - 2))
    p[token] = conf
    logits = p.log()
    logits[mask_id] = logits.max() + 10.0
    return logits
