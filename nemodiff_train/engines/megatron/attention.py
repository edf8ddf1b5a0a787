"""Two-stream core attention for Megatron layers, and the layer spec that installs it.

Megatron's rotary embedding ignores ``position_ids`` (it always uses 0..S-1), but both halves of
``[x_t ; x_0]`` need positions 0..L-1 (restarting at each document start of a packed row). So the
model is built with ``position_embedding_type="none"`` and this module applies RoPE itself, with
the HF model's own inverse frequencies and scaling (so it matches the torch engine and HF
inference), before attending with the pattern of :mod:`nemodiff_train.core.masks`:

* CUDA: flex-attention with a ``BlockMask`` (compiled once per process; if compiling fails, e.g. no
  host C compiler, it falls back to SDPA with a dense mask and says so once);
* CPU (and the fallback): SDPA with the dense boolean mask.

The "attention mask" Megatron hands through its layers is, for this module, the ``[b, L]`` int64
document-id tensor of the clean stream (None = one document per row), always the whole row's. It is
a tensor, so full and selective recompute and pipeline stages carry it unchanged. Masks and RoPE
tables are built once per forward (cached on the identity of that tensor) and shared by all layers.

Context parallelism (``engine.cp > 1``): each rank holds ``2L/cp`` positions of the row in Megatron's
order (:mod:`.context_parallel`). RoPE is applied to the local queries and keys at their global
positions, keys and values are all-gathered over the CP group (backward reduce-scatters their
gradients), and the local queries attend with their rows of the same mask (dense rows for SDPA, a
``BlockMask`` of ``2L/cp`` query rows for flex-attention).
"""

from __future__ import annotations

import logging
import math
import weakref
from typing import Any

import torch
import torch.nn.functional as F

from ...core.masks import SequenceLayout, dense_mask, document_positions, flex_block_mask, get_pattern
from .context_parallel import cp_positions, gather_for_cp, local_mask_rows

log = logging.getLogger(__name__)

__all__ = ["TwoStreamCoreAttention", "two_stream_layer_spec", "rope_settings", "rotate_half", "SETTINGS_ATTR"]

SETTINGS_ATTR = "nemodiff"  # provider/TransformerConfig attribute holding the DLM settings dict


def rope_settings(hf_config) -> dict[str, Any]:
    """RoPE of an HF config as plain data: ``inv_freq`` (list), ``scaling`` and Llama-4 query scaling.

    Uses the HF rope initialisation (``default`` computed here, every other type through
    ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS``), so YaRN/llama3 scaling match HF.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    params = dict(getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if rope_type == "default":
        base = params.get("rope_theta", getattr(text, "rope_theta", 10000.0))
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        scaling = 1.0
    elif rope_type == "dynamic":
        raise NotImplementedError("dynamic RoPE scaling depends on the sequence length; not supported")
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](text, "cpu")
    if 2 * inv_freq.numel() != head_dim:
        raise NotImplementedError(f"partial rotary embeddings (rotary dim {2 * inv_freq.numel()} of head dim "
                                  f"{head_dim}) are not supported")
    return {
        "inv_freq": [float(x) for x in inv_freq.float().tolist()],
        "scaling": float(scaling),
        "llama4_beta": params.get("llama_4_scaling_beta"),
        "llama4_max": params.get("original_max_position_embeddings"),
    }


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


_compiled_flex = None
_flex_failed = False


_probed: set = set()


def _flex(q, k, v, block_mask, scale):
    """Compiled flex-attention. The first call per shape (when training) also runs a throw-away
    backward, so that a compile failure of the backward kernels (compiled lazily by torch) surfaces
    here, inside the caller's fallback, and not later in Megatron's backward pass."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    gqa = q.shape[1] != k.shape[1]
    key = (tuple(q.shape), tuple(k.shape), q.dtype, q.device)
    if torch.is_grad_enabled() and q.requires_grad and key not in _probed:
        with torch.enable_grad():
            pq, pk, pv = (t.detach().requires_grad_() for t in (q, k, v))
            _compiled_flex(pq, pk, pv, block_mask=block_mask, scale=scale, enable_gqa=gqa).float().sum().backward()
        _probed.add(key)
    return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)


class _Prepared:
    """Per-forward data shared by all layers: RoPE tables and the mask (dense or BlockMask)."""

    def __init__(self, key_ref, cos, sin, qscale, mask, kind, cp_key):
        self.key_ref, self.cos, self.sin, self.qscale, self.mask, self.kind = key_ref, cos, sin, qscale, mask, kind
        self.cp_key = cp_key  # (cp size, cp rank): tables and mask rows are this rank's


class TwoStreamCoreAttention(torch.nn.Module):
    """Drop-in ``core_attention`` for Megatron's ``SelfAttention`` (same constructor and forward).

    forward: ``query [2L, b, np, hn]``, ``key/value [2L, b, ng, hn]`` (RoPE not applied),
    ``attention_mask`` = ``[b, L]`` doc ids or None → ``[2L, b, np·hn]``; with CP, ``2L/cp`` local
    positions and the whole row's doc ids, ``[b, L]`` or ``[b, L, k]`` (k equal columns: the layout
    that survives a multimodal wrapper's own CP slicing, see :mod:`.step`).
    """

    _cache: "_Prepared | None" = None  # shared by every layer of the process

    def __init__(self, config, layer_number: int, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, **megatron_kwargs):
        """Megatron's ``core_attention`` constructor, called with keywords by ``build_module``; the
        ones not named here (``attn_mask_type``, ``attention_type``, ``cp_comm_type``) do not apply:
        the mask is ours, and context parallelism is always the K/V all-gather. The CP group is
        ``pg_collection.cp`` when Megatron passes one, else ``parallel_state``'s."""
        super().__init__()
        settings = getattr(config, SETTINGS_ATTR, None)
        if not settings:
            raise ValueError(f"TwoStreamCoreAttention needs `config.{SETTINGS_ATTR}` (set by "
                             "nemodiff_train.engines.megatron.model.build_provider)")
        self.cp_group = _cp_group(config, megatron_kwargs.get("pg_collection"))
        self.config = config
        self.layer_number = layer_number
        self.pattern = get_pattern(settings["pattern"])
        if self.pattern.streams != 2:
            raise ValueError(f"two-stream attention needs a two-stream pattern, got {self.pattern.name!r}")
        self.block_size = int(settings["block_size"])
        self.backend = settings.get("attention_backend", "auto")
        rope = settings["rope"]
        self.register_buffer("inv_freq", torch.tensor(rope["inv_freq"], dtype=torch.float32), persistent=False)
        self.rope_scaling = float(rope["scaling"])
        self.llama4_beta = rope.get("llama4_beta")
        self.llama4_max = rope.get("llama4_max")
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    # ---- per-forward preparation (cached across layers) -------------------------------------------------
    def _cp(self) -> tuple[int, int]:
        g = self.cp_group
        if g is None:
            return 1, 0
        import torch.distributed as dist

        return dist.get_world_size(g), dist.get_rank(g)

    def _prepare(self, mask_arg: torch.Tensor | None, b: int, length: int, device, dtype) -> _Prepared:
        """Tables and mask for the ``attention_mask`` argument ``mask_arg`` (cached on its identity)."""
        cp, cp_rank = self._cp()
        c = TwoStreamCoreAttention._cache
        if c is not None and c.key_ref() is not None and c.key_ref() is mask_arg and c.cos.dtype == dtype \
                and c.cos.device == device and c.cp_key == (cp, cp_rank):
            return c
        doc_ids = mask_arg[..., 0] if mask_arg is not None and mask_arg.dim() == 3 else mask_arg
        if doc_ids is None:
            pos = torch.arange(length, device=device).expand(b, length)
        else:
            if doc_ids.shape != (b, length):
                raise ValueError(f"doc ids {tuple(doc_ids.shape)} do not match the batch ({b}, L={length})")
            pos = document_positions(doc_ids)
        pos2 = torch.cat([pos, pos], dim=1)  # [b, 2L], both halves 0..L-1 per document
        freqs = pos2[..., None].float() * self.inv_freq.to(device)[None, None, :]
        emb = torch.cat([freqs, freqs], dim=-1)  # [b, 2L, hn]
        cos = (emb.cos() * self.rope_scaling).to(dtype)[:, None]  # [b, 1, 2L, hn]
        sin = (emb.sin() * self.rope_scaling).to(dtype)[:, None]
        qscale = None
        if self.llama4_beta and self.llama4_max:
            qscale = (1 + self.llama4_beta * torch.log1p(torch.floor(pos2.float() / self.llama4_max)))
            qscale = qscale[:, None, :, None].to(dtype)
        layout = SequenceLayout(length, self.block_size, doc_ids)
        flex = device.type == "cuda" and self.backend in ("auto", "flex") and not _flex_failed
        if cp > 1:  # this rank's positions of the row: its slice of the tables, its rows of the mask
            local = cp_positions(2 * length, cp, cp_rank, device=device)
            cos, sin = cos.index_select(2, local), sin.index_select(2, local)
            qscale = qscale.index_select(2, local) if qscale is not None else None
            mask = local_mask_rows(self.pattern, layout, local, b, flex=flex, device=device)
        elif flex:
            mask = flex_block_mask(self.pattern, layout, b, device=device)
        else:
            mask = dense_mask(self.pattern, layout, b, device=device)
        key_ref = weakref.ref(mask_arg) if mask_arg is not None else (lambda: None)
        prepared = _Prepared(key_ref, cos, sin, qscale, mask, "flex" if flex else "sdpa", (cp, cp_rank))
        if doc_ids is not None:
            TwoStreamCoreAttention._cache = prepared
        return prepared

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **unused):
        global _flex_failed
        if packed_seq_params is not None:
            raise NotImplementedError("packed_seq_params (THD) is not used: packing is expressed by document ids")
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by the two-stream attention")
        s, b, nq, hn = query.shape  # s = 2L / cp local positions
        cp = self._cp()[0]
        if (s * cp) % 2:
            raise ValueError(f"two-stream rows have even length 2L, got {s * cp}")
        mask_arg = attention_mask if (attention_mask is not None and attention_mask.dtype != torch.bool) else None
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            raise ValueError("pass the [b, L] document ids (or None) as attention_mask, not a boolean mask")
        length = s * cp // 2
        p = self._prepare(mask_arg, b, length, query.device, query.dtype)
        q = query.permute(1, 2, 0, 3)  # [b, np, 2L/cp, hn]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        q = q * p.cos + rotate_half(q) * p.sin
        k = k * p.cos + rotate_half(k) * p.sin
        if p.qscale is not None:
            q = q * p.qscale
        if cp > 1:  # every key and value of the row, in global order (backward: reduce-scatter)
            k, v = gather_for_cp(k, self.cp_group, dim=2), gather_for_cp(v, self.cp_group, dim=2)
        out = None
        if p.kind == "flex":
            if self.dropout and self.training:
                raise NotImplementedError("attention dropout is not supported with flex-attention")
            try:
                out = _flex(q.contiguous(), k.contiguous(), v.contiguous(), p.mask, self.softmax_scale)
            except Exception as e:  # compile failure (no C compiler / Triton): dense SDPA from now on
                if self.backend == "flex":  # asked for explicitly: do not hide it
                    raise
                _flex_failed = True
                log.warning("flex-attention failed (%s: %s); falling back to SDPA with a dense mask",
                            type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
                TwoStreamCoreAttention._cache = None
                p = self._prepare(mask_arg, b, length, query.device, query.dtype)
        if out is None:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=p.mask, dropout_p=self.dropout if self.training else 0.0,
                scale=self.softmax_scale, enable_gqa=nq != k.shape[1])
        return out.permute(2, 0, 1, 3).reshape(s, b, nq * hn)


def _cp_group(config, pg_collection):
    """The context-parallel group of this attention (None when ``context_parallel_size`` is 1)."""
    if int(getattr(config, "context_parallel_size", 1) or 1) == 1:
        return None
    group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_context_parallel_group()
    return group


def _use_te(config) -> bool:
    impl = (getattr(config, SETTINGS_ATTR, None) or {}).get("transformer_impl", "auto")
    if impl == "local":
        return False
    from megatron.core.extensions.transformer_engine import HAVE_TE

    if impl == "transformer_engine" and not HAVE_TE:
        raise RuntimeError("engine.transformer_impl=transformer_engine but Transformer Engine is not installed")
    return bool(HAVE_TE)


def two_stream_layer_spec(config):
    """The GPT layer spec (Transformer Engine where installed, local otherwise) with our core attention.

    Module-level so a provider can name it as ``transformer_layer_spec`` (serialisable by path).
    """
    from megatron.bridge.models.gpt_provider import local_layer_spec, transformer_engine_layer_spec

    spec = transformer_engine_layer_spec(config) if _use_te(config) else local_layer_spec(config)
    spec.submodules.self_attention.submodules.core_attention = TwoStreamCoreAttention
    return spec
