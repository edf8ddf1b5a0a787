"""The decoders' :class:`~nemodiff_train.decoding.interface.CachedLM` over a Hugging Face model.

Uses transformers' own ``DynamicCache`` and passes the decoder's explicit mask as a 4-D tensor, which
transformers hands to the attention kernel unchanged; a read-only (diffusion) pass runs with the
cache and then drops the positions it appended, so cached K/V are read but never overwritten.
"""

from __future__ import annotations

import torch
from torch import nn

from .hf import DLMModel, cache_kwarg

__all__ = ["HFCachedLM"]


class HFCachedLM:
    """Adapter from a HF ``*ForCausalLM`` (or a :class:`DLMModel`) to the decoders' interface.

    Args:
        model: a :class:`DLMModel` or a bare HF causal LM.
        mask_token_id: required when ``model`` is a bare HF model.
    """

    def __init__(self, model: DLMModel | nn.Module, mask_token_id: int | None = None):
        self.hf = model.hf if isinstance(model, DLMModel) else model
        if mask_token_id is None:
            if not isinstance(model, DLMModel):
                raise ValueError("a bare HF model needs mask_token_id")
            mask_token_id = model.settings.mask_token_id
        self.mask_token_id = int(mask_token_id)
        self.vocab_size = int(self.hf.get_output_embeddings().weight.shape[0])
        self._cache_kw = cache_kwarg(self.hf)
        self.device = next(self.hf.parameters()).device
        self.dtype = next(self.hf.parameters()).dtype

    def new_cache(self, batch_size: int):
        from transformers import DynamicCache

        return DynamicCache(config=self.hf.config)

    def cache_length(self, cache) -> int:
        return int(cache.get_seq_length())

    @torch.inference_mode()
    def forward(self, cache, input_ids, position_ids, attention_mask, write_cache: bool) -> torch.Tensor:
        cached = self.cache_length(cache)
        if attention_mask.shape[-1] != cached + input_ids.shape[1]:
            raise ValueError(f"mask covers {attention_mask.shape[-1]} keys, cache+new = {cached + input_ids.shape[1]}")
        out = self.hf(input_ids=input_ids.to(self.device), position_ids=position_ids.to(self.device),
                      attention_mask=attention_mask[:, None].to(self.device), use_cache=True,
                      **{self._cache_kw: cache})
        if not write_cache:
            self.keep_cache(cache, torch.arange(cached))
        return out.logits.float()

    def keep_cache(self, cache, positions: torch.Tensor) -> None:
        positions = positions.to(self.device)
        for layer in cache.layers:
            if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
                continue
            layer.keys = layer.keys.index_select(-2, positions)
            layer.values = layer.values.index_select(-2, positions)

    def cache_tensors(self, cache):
        return [(layer.keys, layer.values) for layer in cache.layers]
