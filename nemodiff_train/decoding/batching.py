"""A KV cache plus the bookkeeping every decoder needs: left padding, positions, attention masks.

Prompts of different lengths are LEFT padded to a common length P, so all rows share the cache
length C and new tokens append at the same column. Pad keys are masked out of every query, position
ids count from each row's first real token, and a pad query attends to itself only (an all-False
row would make the softmax NaN). Self-speculation keeps a different number of new columns per row after
each cycle; :meth:`CacheState.commit` re-packs the rows right aligned (the left padding of a row changes),
on the device. Nothing here knows about a decoding mode.
"""

from __future__ import annotations

from typing import Any

import torch

from .interface import CachedLM

__all__ = ["CacheState", "causal_mask", "full_mask"]


def causal_mask(q: int, device=None) -> torch.Tensor:
    """``[q, q]`` bool, True on and below the diagonal."""
    return torch.ones(q, q, dtype=torch.bool, device=device).tril()


def full_mask(q: int, device=None) -> torch.Tensor:
    """``[q, q]`` all True (a bidirectional block)."""
    return torch.ones(q, q, dtype=torch.bool, device=device)


class CacheState:
    """One batch's KV cache and which of its positions are real tokens.

    Args:
        model: the :class:`CachedLM`.
        prompts: ``b`` non-empty lists of token ids.

    Attributes:
        cache: the model's cache object (C positions).
        valid: ``[b, C]`` bool, False on left-padding positions.
        pad: ``[b]`` left-padding length per row.
    """

    def __init__(self, model: CachedLM, prompts: list[list[int]]):
        if not prompts:
            raise ValueError("no prompts given")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty: decoding needs at least one prompt token")
        self.model = model
        self.device = torch.device(getattr(model, "device", "cpu"))
        self.batch = len(prompts)
        self.pad = torch.tensor([max(map(len, prompts)) - len(p) for p in prompts], device=self.device)
        self.valid = torch.zeros(self.batch, 0, dtype=torch.bool, device=self.device)
        self.cache: Any = model.new_cache(self.batch)
        self.has_adapter = bool(getattr(model, "has_adapter", False))
        self._prompts = prompts

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def prefill(self) -> torch.Tensor:
        """Causal pass over the left-padded prompts, writing the cache; returns ``[b, V]`` last logits."""
        width = max(len(p) for p in self._prompts)
        ids = torch.zeros(self.batch, width, dtype=torch.long, device=self.device)  # pad id: any non-mask id
        for r, p in enumerate(self._prompts):
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long, device=self.device)
        real = torch.arange(width, device=self.device)[None] >= self.pad[:, None]  # [b, P]
        # causal over real keys; every (pad) query also sees itself so no softmax row is empty
        new = causal_mask(width, self.device)[None] & real[:, None, :]
        new |= torch.eye(width, dtype=torch.bool, device=self.device)[None]
        positions = (torch.arange(width, device=self.device)[None] - self.pad[:, None]).clamp(min=0)
        logits = self.model.forward(self.cache, ids, positions, new, write_cache=True)
        self.valid = real
        return logits[:, -1]

    def positions(self, offsets: torch.Tensor) -> torch.Tensor:
        """RoPE positions ``[b, q]`` of new tokens at cache columns ``C + offsets`` (``offsets`` ``[q]``)."""
        return self.length + offsets.to(self.device)[None] - self.pad[:, None]

    def forward(self, tokens: torch.Tensor, new_mask: torch.Tensor, write_cache: bool,
                offsets: torch.Tensor | None = None, draft: bool | torch.Tensor = False) -> torch.Tensor:
        """One model call after the prompt.

        Args:
            tokens: ``[b, q]`` new tokens.
            new_mask: ``[q, q]`` (or ``[b, q, q]``) bool among the new tokens; every real cached key is
                visible to every new query.
            write_cache: append the new keys (causal passes only).
            offsets: ``[q]`` position offset of each new token from C (default ``arange(q)``).
            draft: which new tokens are drafter tokens (the model's adapter on, when it has one):
                True (all), False (none: the base model) or a ``[q]`` bool tensor.
        Returns:
            ``[b, q, V]`` logits.
        """
        b, q = tokens.shape
        if offsets is None:
            offsets = torch.arange(q, device=self.device)
        cached = self.valid[:, None, :].expand(b, q, self.length)
        mask = torch.cat([cached, new_mask.to(self.device).expand(b, q, q)], dim=-1)  # [b, q, C + q]
        extra = {}
        if self.has_adapter and not (isinstance(draft, bool) and not draft):
            gate = torch.ones(q, dtype=torch.bool, device=self.device) if isinstance(draft, bool) \
                else draft.to(device=self.device, dtype=torch.bool)
            extra["adapter_gate"] = gate[None].expand(b, q)  # [b, q]
        logits = self.model.forward(self.cache, tokens.to(self.device), self.positions(offsets), mask, write_cache,
                                    **extra)
        if write_cache:
            self.valid = torch.cat([self.valid, torch.ones(b, q, dtype=torch.bool, device=self.device)], dim=1)
        return logits

    def keep(self, positions: torch.Tensor) -> None:
        """Keep only cache columns ``positions`` (``[n]`` increasing, the same for every row)."""
        positions = positions.to(self.device)
        self.model.keep_cache(self.cache, positions)
        self.valid = self.valid[:, positions]

    def commit(self, base: int, select: torch.Tensor, keep: torch.Tensor, new_length: int) -> None:
        """Keep, per row, its cached tokens plus ``keep[r]`` of the columns a pass wrote at ``base``; re-pack.

        Self-speculation accepts a different number of tokens per row, so after a cycle each row keeps a
        different number of new columns. Every row is re-packed RIGHT aligned into ``new_length`` columns
        (its left padding grows or shrinks), so all rows again share one cache length and the next pass
        appends at one column. Done with one per-row gather on the device (no host read).

        Args:
            base: the cache column where the cycle's write-pass started (the length before it).
            select: ``[n]`` or ``[b, n]`` int64 offsets from ``base`` of the columns a row may keep, in order.
            keep: ``[b]`` int64 how many of them row r keeps (a prefix of ``select``).
            new_length: ``max_r(cached tokens of row r after the commit)``, known on the host.
        """
        b = self.batch
        select = select.to(self.device).expand(b, -1)  # [b, n]
        count = base - self.pad  # [b] real tokens cached before the pass
        pad = new_length - (count + keep)  # [b] new left padding
        t = torch.arange(new_length, device=self.device)[None] - pad[:, None]  # [b, L'] index among kept tokens
        new = base + select.gather(1, (t - count[:, None]).clamp(0, select.shape[1] - 1))
        src = torch.where(t < count[:, None], self.pad[:, None] + t, new)
        src = torch.where(t < 0, torch.zeros_like(src), src)  # left padding: any column, masked out
        self.model.keep_cache(self.cache, src)
        self.valid = t >= 0
        self.pad = pad

    def row_cache(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(keys, values)`` ``[1, kv_heads, C_row, head_dim]`` of one row, padding removed."""
        cols = self.valid[row].nonzero()[:, 0]
        return [(k[row:row + 1].index_select(-2, cols.to(k.device)).clone(),
                 v[row:row + 1].index_select(-2, cols.to(v.device)).clone())
                for k, v in self.model.cache_tensors(self.cache)]
