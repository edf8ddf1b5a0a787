"""The small model interface every decoder runs on.

A decoder never sees transformers, only :class:`CachedLM`: forward some tokens at given positions
with an explicit attention mask over (cached keys + new keys), optionally writing the new keys to the
KV cache, and edit the cache (keep a subset of its positions). The KV cache only ever holds states
from causal passes (docs/decoding.md, "KV cache"); a diffusion pass reads the cache with ``write_cache=False``.

Drafter adapters (docs/adapters.md): a model with ``has_adapter = True`` also takes ``adapter_gate``, a
``[b, q]`` bool saying which new tokens run with the adapter on (draft and denoise tokens) and which
with it off (AR steps, verify tokens, causal re-encodes: the unchanged base). Decoders send it only to
such a model (:class:`~nemodiff_train.decoding.batching.CacheState`), so a model without the attribute
needs no such argument.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["CachedLM"]


@runtime_checkable
class CachedLM(Protocol):
    """What decoders need from a model.

    Attributes:
        mask_token_id: id of ``[MASK]``; decoders never emit it.
        vocab_size: number of logit columns.
        has_adapter: optional (absent = False): ``forward`` takes ``adapter_gate``.
    """

    mask_token_id: int
    vocab_size: int

    def new_cache(self, batch_size: int) -> Any:
        """An empty KV cache for ``batch_size`` rows."""

    def cache_length(self, cache: Any) -> int:
        """Number of cached positions C (the same for every row; left padding is masked out)."""

    def forward(self, cache: Any, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, write_cache: bool) -> torch.Tensor:
        """One model call.

        Args:
            cache: the KV cache (C positions).
            input_ids: ``[b, q]`` new tokens.
            position_ids: ``[b, q]`` their RoPE positions.
            attention_mask: ``[b, q, C + q]`` bool, True where new query i may attend cached/new key j.
            write_cache: append the q new keys/values to the cache (causal passes only). When False
                the cache is unchanged afterwards.
            adapter_gate: (only when ``has_adapter``) ``[b, q]`` bool, True where the drafter adapter
                is on; None = off for every token.
        Returns:
            ``[b, q, V]`` float32 logits.
        """

    def keep_cache(self, cache: Any, positions: torch.Tensor) -> None:
        """Keep only the given cached positions, in that order: ``[n]`` int64 (the same for every row,
        increasing) or ``[b, n]`` (per row, any order; batched self-speculation re-packs rows this way).

        Cropping to the first n positions is ``keep_cache(cache, arange(n))``. Afterwards the cache has n
        positions.
        """

    def cache_tensors(self, cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each ``[b, kv_heads, C, head_dim]`` (for tests and tools)."""
