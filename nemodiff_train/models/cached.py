"""The decoders' :class:`~nemodiff_train.decoding.interface.CachedLM` over a Hugging Face model.

Uses transformers' ``DynamicCache`` with full (never truncated) layers and passes the decoder's explicit
mask as a 4-D mask in the form the model's attention implementation reads (:mod:`.attention`); a
read-only (diffusion) pass runs with the cache and then drops the positions it appended, so cached K/V
are read but never overwritten.

Sliding windows: transformers' sliding-window cache drops keys on its own, out of step with the
decoders' masks and cache edits (a crash, or keys silently missing). So the cache keeps every key, the
RoPE position of each cached key is tracked beside it, and each windowed layer's mask additionally
hides keys ``window`` or more positions behind the query (one mask per layer type when layers differ),
which is exactly what the base model's windowed layers see.

Drafter adapters (:mod:`.adapter`): ``forward``'s ``adapter_gate`` (``[b, q]`` bool, None = off) switches
the model's adapter per token for that one call, so every decoder shares one model and no copy exists
per pass kind. ``has_adapter`` tells the decoders whether to send a gate at all.

This module imports only torch, the standard library and (inside functions) transformers, with
:mod:`.arch`, :mod:`.attention` and :mod:`.adapter`: the exported remote code inlines all three
(``export/remote_code.py``), so ``trust_remote_code`` users decode through this very adapter.
"""

from __future__ import annotations

import torch

from .adapter import adapter_tokens, find_adapter
from .arch import attn_implementation_of, cache_kwarg, layer_windows
from .attention import implementation_form, window_keep

__all__ = ["HFCachedLM", "PositionedCache", "gather_columns"]


def gather_columns(x: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Cache columns of ``x`` (``[b, C]`` or ``[b, h, C, d]``): ``columns`` ``[n]`` for every row (index_select)
    or ``[b, n]`` per row (gather; no host read). Returns ``x`` with ``n`` columns."""
    dim = 1 if x.dim() == 2 else 2
    if columns.dim() == 1:
        return x.index_select(dim, columns)
    if dim == 1:
        return x.gather(1, columns)
    b, h, _, d = x.shape
    return x.gather(2, columns[:, None, :, None].expand(b, h, columns.shape[1], d))


class PositionedCache:
    """A transformers ``DynamicCache`` plus the RoPE position of every cached key.

    Attributes:
        kv: the ``DynamicCache``.
        positions: ``[b, C]`` int64 position of each cached column.
    """

    def __init__(self, batch_size: int, device: torch.device):
        from transformers import DynamicCache

        self.kv = DynamicCache()  # no config: full layers only (see the module docstring)
        self.positions = torch.zeros(batch_size, 0, dtype=torch.long, device=device)

    def get_seq_length(self) -> int:
        return int(self.kv.get_seq_length())


class HFCachedLM:
    """Adapter from a HF ``*ForCausalLM`` (or a :class:`DLMModel`) to the decoders' interface.

    Args:
        model: a :class:`~nemodiff_train.models.hf.DLMModel` or a bare HF causal LM.
        mask_token_id: required when ``model`` is a bare HF model.
    Raises:
        UnsupportedModelError: an attention implementation or layer layout the masks cannot express.
    """

    def __init__(self, model, mask_token_id: int | None = None):
        is_dlm = hasattr(model, "hf") and hasattr(model, "settings")  # a DLMModel (not imported: see above)
        self.hf = model.hf if is_dlm else model
        if mask_token_id is None:
            if not is_dlm:
                raise ValueError("a bare HF model needs mask_token_id")
            mask_token_id = model.settings.mask_token_id
        self.mask_token_id = int(mask_token_id)
        self.vocab_size = int(self.hf.get_output_embeddings().weight.shape[0])
        self._cache_kw = cache_kwarg(self.hf)
        self.device = next(self.hf.parameters()).device
        self.dtype = next(self.hf.parameters()).dtype
        attn_implementation_of(self.hf)
        self.windows = layer_windows(self.hf.config, self.hf.get_decoder())

    @property
    def has_adapter(self) -> bool:
        """A drafter adapter is attached to the model (read per call: one may be attached later)."""
        return find_adapter(self.hf) is not None

    def new_cache(self, batch_size: int) -> PositionedCache:
        return PositionedCache(batch_size, self.device)

    def cache_length(self, cache: PositionedCache) -> int:
        return cache.get_seq_length()

    def model_mask(self, allowed: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor):
        """The decoder's ``[b, q, K]`` boolean mask as the model's ``attention_mask`` argument.

        Each layer type's sliding window is applied with the RoPE positions; the result is in the form
        of the attention implementation (one mask, or ``{layer type: mask}`` when layers differ).
        """
        implementation = attn_implementation_of(self.hf)
        base = allowed[:, None]

        def build(window):
            keep = window_keep(query_positions, key_positions, window)
            return implementation_form(base if keep is None else base & keep, implementation, self.dtype)

        if self.windows.uniform:
            return build(self.windows.windows[0] if self.windows.windows else None)
        built = {w: build(w) for w in set(self.windows.windows)}
        return {t: built[w] for t, w in self.windows.by_type().items()}

    @torch.inference_mode()
    def forward(self, cache: PositionedCache, input_ids, position_ids, attention_mask, write_cache: bool,
                adapter_gate: torch.Tensor | None = None) -> torch.Tensor:
        cached = self.cache_length(cache)
        if attention_mask.shape[-1] != cached + input_ids.shape[1]:
            raise ValueError(f"mask covers {attention_mask.shape[-1]} keys, cache+new = {cached + input_ids.shape[1]}")
        position_ids = position_ids.to(self.device)
        keys = torch.cat([cache.positions, position_ids], dim=1)
        mask = self.model_mask(attention_mask.to(self.device), position_ids, keys)
        gate = None if adapter_gate is None else adapter_gate.to(self.device)
        with adapter_tokens(self.hf, gate):
            out = self.hf(input_ids=input_ids.to(self.device), position_ids=position_ids, attention_mask=mask,
                          use_cache=True, **{self._cache_kw: cache.kv})
        if write_cache:
            cache.positions = keys
        else:
            self.keep_cache(cache, torch.arange(cached, device=self.device))
        return out.logits.float()

    def keep_cache(self, cache: PositionedCache, positions: torch.Tensor) -> None:
        """Keep cached columns ``positions``: ``[n]`` (every row) or ``[b, n]`` (per row, batched self-speculation)."""
        positions = positions.to(self.device)
        for layer in cache.kv.layers:
            if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
                continue
            layer.keys = gather_columns(layer.keys, positions)
            layer.values = gather_columns(layer.values, positions)
        cache.positions = gather_columns(cache.positions, positions)

    def cache_tensors(self, cache: PositionedCache):
        return [(layer.keys, layer.values) for layer in cache.kv.layers]
