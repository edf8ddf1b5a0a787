"""Forwards of a decode by shape: the speed-of-light prediction of ``nemodiff-bench`` prices each one."""

from __future__ import annotations

from collections import Counter

__all__ = ["ShapeCounter"]


class ShapeCounter:
    """A :class:`CachedLM` wrapper that counts forwards by ``(batch, q, prefill)`` (prefill = empty cache)."""

    def __init__(self, lm):
        self.lm, self.counts = lm, Counter()
        self.mask_token_id, self.vocab_size = lm.mask_token_id, lm.vocab_size
        self.device = lm.device

    def new_cache(self, batch_size):
        return self.lm.new_cache(batch_size)

    def cache_length(self, cache):
        return self.lm.cache_length(cache)

    @property
    def has_adapter(self) -> bool:
        return bool(getattr(self.lm, "has_adapter", False))

    def forward(self, cache, input_ids, position_ids, attention_mask, write_cache, **kwargs):
        b, q = input_ids.shape
        self.counts[(b, q, self.lm.cache_length(cache) == 0)] += 1
        # kwargs: the drafter adapter's per-token gate, passed through so the counted pass is the real one
        return self.lm.forward(cache, input_ids, position_ids, attention_mask, write_cache, **kwargs)

    def keep_cache(self, cache, positions):
        return self.lm.keep_cache(cache, positions)

    def cache_tensors(self, cache):
        return self.lm.cache_tensors(cache)
