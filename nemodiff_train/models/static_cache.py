"""A static-shape :class:`~nemodiff_train.decoding.interface.CachedLM`: preallocated KV, fixed-shape passes.

:class:`HFCachedLM` (:mod:`.cached`) grows a ``DynamicCache`` by concatenation and re-slices it on every
crop, so each forward allocates and every shape changes. Here every row owns ``capacity`` preallocated
cache columns per layer:

* a forward of q new tokens writes their K/V in place at columns ``[C, C + q)`` (``index_copy_`` at a
  device-side start index, so the write is part of a capturable graph) and attends over ALL ``capacity``
  columns, the columns at and beyond ``C + q`` hidden by the mask. Attention shapes then depend only on
  (batch, q): one shape per pass kind (1-token AR step, B-token bidirectional draft/denoise, B-token
  causal verify/re-encode, B(B+1)-token quadratic layout);
* a read-only (diffusion) pass writes the same columns but does not advance C: the next pass
  overwrites them, and no later mask ever shows a column ``>= C`` that the pass has not written itself;
* ``keep_cache`` gathers the kept columns (the same for every row, or per row: batched self-speculation
  re-packs each row on the device) into the prefix in place; nothing is reallocated.

Masked columns contribute exactly 0 to attention (``exp`` of the additive minimum or of −inf is 0),
so the outputs equal the dynamic path's up to float reduction order (tests/unit/test_static_cache.py
checks token equality for all four decoders).

CUDA graphs (``cuda_graphs=True``, CUDA only): each (batch, q) shape after the prefill is captured once
with ``torch.cuda.CUDAGraph`` over static input buffers (token ids, positions, mask, write index) and
then replayed; the prefill (its length changes with every prompt) runs eagerly. With a drafter adapter
(:mod:`.adapter`) the per-token adapter gate is one more static input buffer, always a tensor (all
False for base passes), so one capture per shape serves draft and verify passes alike. Buffers are per batch
size and reused across :meth:`StaticCachedLM.new_cache` calls, so graphs survive from one prompt to the
next; the cache that a later ``new_cache`` of the same batch size replaces refuses further use.

Compilation (``compile=True``): the post-prefill forwards run through ``torch.compile`` (inductor,
dynamic shapes: one compilation serves every (batch, q), no CUDA-graph trees of its own) and, with
``cuda_graphs``, the compiled kernels are what each graph captures: fused kernels replayed without
launch overhead, which is what HF's static-cache ``generate`` does (its forward is compiled and replayed
by torch's graph trees). The prefill stays eager (its length changes with every prompt).

Like :mod:`.cached`, this module imports only torch, the standard library, transformers (inside
functions) and :mod:`.cached`'s own imports: the exported remote code inlines it (``export/remote_code.py``).
"""

from __future__ import annotations

import torch

from .adapter import adapter_tokens
from .arch import attn_implementation_of
from .cached import HFCachedLM, gather_columns

__all__ = ["StaticCachedLM", "StaticKVCache", "slot_layer_class", "required_capacity"]

_SLOT_LAYER = None


def slot_layer_class():
    """transformers' ``CacheLayerMixin`` subclass holding one layer's preallocated K/V (built lazily:
    transformers is imported only when a model is)."""
    global _SLOT_LAYER
    if _SLOT_LAYER is not None:
        return _SLOT_LAYER
    from transformers.cache_utils import CacheLayerMixin

    class SlotLayer(CacheLayerMixin):
        """``keys``/``values`` ``[b, kv_heads, capacity, head_dim]``; writes land at ``start`` (0-d device tensor)."""

        is_compileable = True
        is_sliding = False

        def __init__(self, capacity: int, start: torch.Tensor):
            super().__init__()
            self.capacity = capacity
            self.start = start

        def lazy_initialization(self, key_states, value_states):
            b, heads = key_states.shape[:2]
            self.keys = torch.zeros(b, heads, self.capacity, key_states.shape[-1],
                                    dtype=key_states.dtype, device=key_states.device)
            self.values = torch.zeros(b, heads, self.capacity, value_states.shape[-1],
                                      dtype=value_states.dtype, device=value_states.device)
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            cols = torch.arange(key_states.shape[-2], device=key_states.device) + self.start
            self.keys.index_copy_(2, cols, key_states)
            self.values.index_copy_(2, cols, value_states)
            return self.keys, self.values

        def get_mask_sizes(self, *args, **kwargs):
            return self.capacity, 0

        def get_seq_length(self, *args, **kwargs):
            return int(self.start)

        def get_max_length(self):
            return self.capacity

        def get_max_cache_shape(self):  # abstract in transformers < 5.14 (since renamed get_max_length)
            return self.capacity

        def reset(self):
            self.start.zero_()

    _SLOT_LAYER = SlotLayer
    return SlotLayer


def required_capacity(prompt_len: int, max_new_tokens: int, block_size: int, modes=("quadratic_spec",),
                      multiple: int = 64) -> int:
    """Cache columns a decode needs: prompt + generated tokens + the widest pass beyond them (B(B+1) for
    quadratic self-speculation, else B), rounded up to ``multiple`` so nearby sizes share buffers and graphs."""
    widest = block_size * (block_size + 1) if "quadratic_spec" in modes else block_size
    need = prompt_len + max_new_tokens + widest + 1
    return -(-need // multiple) * multiple


class StaticKVCache:
    """The decoders' cache object: per-layer preallocated K/V plus per-column bookkeeping.

    Attributes:
        kv: a transformers ``Cache`` of slot layers (what the HF model's attention updates).
        positions: ``[b, capacity]`` int64 RoPE position of each column (valid below ``length``).
        length: C, the number of valid columns (Python int; the same for every row).
        start: 0-d int64 device tensor, the column where the next forward writes (= ``length``).
        capacity: columns per row.
    """

    def __init__(self, batch_size: int, capacity: int, num_layers: int, device: torch.device):
        from transformers.cache_utils import Cache

        self.batch_size, self.capacity, self.length = batch_size, capacity, 0
        self.start = torch.zeros((), dtype=torch.long, device=device)
        layer = slot_layer_class()
        self.kv = Cache(layers=[layer(capacity, self.start) for _ in range(num_layers)])
        self.positions = torch.zeros(batch_size, capacity, dtype=torch.long, device=device)
        self.live = True

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.length = 0
        self.start.zero_()
        self.live = True


class StaticCachedLM(HFCachedLM):
    """:class:`HFCachedLM` with a preallocated cache of ``capacity`` columns per row (see the module docstring).

    Args:
        model: a :class:`~nemodiff_train.models.hf.DLMModel` or a bare HF causal LM.
        mask_token_id: required when ``model`` is a bare HF model.
        capacity: cache columns per row: at least prompt + generated tokens + the widest pass (B(B+1)
            for quadratic self-speculation). A forward that would overflow it raises (never truncates).
        cuda_graphs: capture and replay each post-prefill (batch, q) forward as a CUDA graph (CUDA only;
            the sdpa and eager attention implementations).
        compile: run the post-prefill forwards through ``torch.compile`` (with ``cuda_graphs``: compiled,
            then captured); the first call of each kind pays the compilation.
    Raises:
        UnsupportedModelError: as :class:`HFCachedLM`; ValueError: ``cuda_graphs`` off CUDA or with flex attention.
    """

    def __init__(self, model, mask_token_id: int | None = None, capacity: int = 1024, cuda_graphs: bool = False,
                 compile: bool = False):
        super().__init__(model, mask_token_id)
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a model on CUDA (it is on {self.device})")
        if cuda_graphs and attn_implementation_of(self.hf) not in ("sdpa", "eager"):
            raise ValueError(f"cuda_graphs=True supports attn_implementation sdpa or eager, not "
                             f"{attn_implementation_of(self.hf)!r} (its BlockMask is rebuilt per call)")
        if compile and self.has_adapter:
            raise ValueError("compile=True with a drafter adapter is not supported yet (its per-token gate has not "
                             "been run under torch.compile); use compile=False (CUDA graphs do work with it)")
        self.capacity, self.cuda_graphs, self.compile = int(capacity), bool(cuda_graphs), bool(compile)
        # dynamic=True: the decoders' query lengths vary (linear self-speculation verifies 1..B tokens), and
        # one symbolic-shape compilation serves them all instead of one compilation per length
        self._compiled = torch.compile(self._eager, dynamic=True) if compile else None
        config = self.hf.config.get_text_config() if hasattr(self.hf.config, "get_text_config") else self.hf.config
        self.num_layers = int(config.num_hidden_layers)
        self._caches: dict[int, StaticKVCache] = {}
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool = None

    @torch.inference_mode()
    def new_cache(self, batch_size: int) -> StaticKVCache:
        """The batch size's preallocated cache, emptied; a cache this call replaces refuses further use."""
        old = self._caches.get(batch_size)
        if old is not None:
            old.live = False
            fresh = StaticKVCache.__new__(StaticKVCache)  # same buffers, new handle (so the old one is dead)
            fresh.__dict__.update(old.__dict__)
            fresh.reset()
        else:
            fresh = StaticKVCache(batch_size, self.capacity, self.num_layers, self.device)
        self._caches[batch_size] = fresh
        return fresh

    def cache_length(self, cache: StaticKVCache) -> int:
        return cache.length

    def _check(self, cache: StaticKVCache) -> None:
        if not cache.live:
            raise RuntimeError("this static cache was replaced by a later new_cache() of the same batch size "
                               "(its buffers are shared); decode one batch at a time per batch size")

    @torch.inference_mode()
    def forward(self, cache: StaticKVCache, input_ids, position_ids, attention_mask, write_cache: bool,
                adapter_gate: torch.Tensor | None = None) -> torch.Tensor:
        self._check(cache)
        b, q = input_ids.shape
        C = cache.length
        if attention_mask.shape[-1] != C + q:
            raise ValueError(f"mask covers {attention_mask.shape[-1]} keys, cache+new = {C + q}")
        if C + q > cache.capacity:
            raise ValueError(f"static cache overflow: {C} cached + {q} new > capacity {cache.capacity} columns; "
                             f"build StaticCachedLM with a larger capacity (prompt + max_new_tokens + widest pass)")
        position_ids = position_ids.to(self.device)
        cache.positions[:, C:C + q] = position_ids
        allowed = torch.zeros(b, q, cache.capacity, dtype=torch.bool, device=self.device)
        allowed[:, :, :C + q] = attention_mask.to(self.device)
        mask = self.model_mask(allowed, position_ids, cache.positions)
        cache.start.fill_(C)
        gate = None if adapter_gate is None else adapter_gate.to(self.device)
        if self.cuda_graphs and C > 0:
            if self.has_adapter and gate is None:  # all False = the base exactly; one graph serves on and off
                gate = torch.zeros(b, q, dtype=torch.bool, device=self.device)
            key = (b, q)
            graph = self._graphs.get(key)
            if graph is None or graph.cache_buffers is not cache.kv:
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                graph = self._graphs[key] = _Graph(self, cache, input_ids, position_ids, mask, gate)
            logits = graph.run(input_ids, position_ids, mask, gate)
        else:
            step = self._step if C > 0 else self._eager  # the prefill's length changes per prompt: eager
            logits = step(cache, input_ids.to(self.device), position_ids, mask, gate)
        if write_cache:
            cache.length = C + q
        return logits

    def _step(self, cache: StaticKVCache, input_ids, position_ids, mask, gate=None) -> torch.Tensor:
        """One post-prefill forward: compiled when ``compile`` is on, else eager."""
        return (self._compiled or self._eager)(cache, input_ids, position_ids, mask, gate)

    def _eager(self, cache: StaticKVCache, input_ids, position_ids, mask, gate=None) -> torch.Tensor:
        with adapter_tokens(self.hf, gate):
            out = self.hf(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                          use_cache=True, **{self._cache_kw: cache.kv})
        return out.logits.float()

    @torch.inference_mode()
    def keep_cache(self, cache: StaticKVCache, positions: torch.Tensor) -> None:
        """Keep cached columns ``positions``, ``[n]`` (every row) or ``[b, n]`` (per row), in place.

        ``[n]`` is checked against the cache length on the host; ``[b, n]`` (batched self-speculation, built on
        the device by the decoder) is not, as that check would be a host read per cycle: an out-of-range
        column fails inside ``gather`` instead.
        """
        self._check(cache)
        positions = positions.to(self.device)
        n = int(positions.shape[-1])
        if n > cache.length:
            raise ValueError(f"keep_cache: {n} columns kept out of {cache.length} cached")
        if positions.dim() == 1 and n and int(positions.max()) >= cache.length:
            raise ValueError(f"keep_cache: positions reach beyond the {cache.length} cached columns")
        for layer in cache.kv.layers:
            if not layer.is_initialized:
                continue
            layer.keys[:, :, :n] = gather_columns(layer.keys, positions)
            layer.values[:, :, :n] = gather_columns(layer.values, positions)
        cache.positions[:, :n] = gather_columns(cache.positions, positions)
        cache.length = n

    def cache_tensors(self, cache: StaticKVCache):
        self._check(cache)
        return [(layer.keys[:, :, :cache.length], layer.values[:, :, :cache.length]) for layer in cache.kv.layers]


def _clear_cublas_workspaces() -> None:
    """Free cuBLAS's cached per-stream workspaces (torch's private hook, present since torch 2.1; see _Graph)."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is None:
        raise RuntimeError("this torch has no torch._C._cuda_clearCublasWorkspaces: CUDA-graph capture cannot keep "
                           "its cuBLAS workspace private; use cuda_graphs=False")
    clear()


class _Graph:
    """One captured forward of shape (batch, q) over one cache's buffers; inputs are copied into static tensors."""

    def __init__(self, lm: StaticCachedLM, cache: StaticKVCache, input_ids, position_ids, mask, gate=None):
        self.cache_buffers = cache.kv
        self.gate = None if gate is None else gate.clone()  # the adapter gate: a static input like the ids
        self.ids = input_ids.to(lm.device).clone()
        self.pos = position_ids.clone()
        self.mask = {k: v.clone() for k, v in mask.items()} if isinstance(mask, dict) else mask.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (lazy inits, cuBLAS workspaces)
            for _ in range(2):
                lm._step(cache, self.ids, self.pos, self.mask, self.gate)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # cuBLAS keeps one workspace per (handle, stream) and a captured matmul keeps using the workspace
        # it was captured with. torch.compile's CUDA-graph trees (mode="reduce-overhead", which HF's
        # static-cache generate uses) free every cached workspace when they record. A workspace that lives
        # outside this graph's pool would then be handed to other tensors while our replays still write to
        # it: silent corruption, or an illegal address (seen on an H200 when nemodiff-bench timed HF's
        # compiled generate between our replays). So, like those graph trees, drop the cached workspaces
        # before capture (the capture allocates a fresh one inside our private pool, where only our own
        # captures can reuse it) and after (later eager matmuls do not inherit the pool's workspace).
        _clear_cublas_workspaces()
        with torch.cuda.graph(self.graph, pool=lm._pool):
            self.out = lm._step(cache, self.ids, self.pos, self.mask, self.gate)
        _clear_cublas_workspaces()

    def run(self, input_ids, position_ids, mask, gate=None) -> torch.Tensor:
        if (gate is None) != (self.gate is None):
            raise RuntimeError("adapter gate given to a graph captured without one (or the reverse)")
        if gate is not None:
            self.gate.copy_(gate)
        self.ids.copy_(input_ids)
        self.pos.copy_(position_ids)
        if isinstance(mask, dict):
            for k, v in mask.items():
                self.mask[k].copy_(v)
        else:
            self.mask.copy_(mask)
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites self.out
