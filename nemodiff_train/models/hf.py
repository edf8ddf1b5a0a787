"""Any Hugging Face decoder-only causal LM as a DLM: mask token, untied head, two-stream forward.

Nothing here copies modeling code. The two-stream forward runs the model's own modules on
``[x_t ; x_0]`` with explicit position ids and a prepared 4-D attention mask, which transformers
passes to the attention kernel unchanged, in the form that kernel reads (:mod:`.attention`: boolean
for sdpa, additive float for eager, ``BlockMask`` for flex_attention), with each layer's sliding
window applied as the base model applies it (:mod:`.arch`; one mask per layer type when layers differ).
The output head is the model's own ``forward`` after its decoder (:meth:`DLMModel.head`), so logit
scaling and soft-capping (Granite ``logits_scaling``, Gemma-2 ``final_logit_softcapping``, Cohere
``logit_scale``...) are the architecture's. Tested families: :data:`.arch.TESTED_FAMILIES`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.compaction import Compaction, required_positions
from ..core.masks import SequenceLayout, dense_mask, document_positions, flex_block_mask, get_pattern
from ..core.sequence import two_stream_inputs
from .adapter import DrafterAdapter, adapter_tokens, attach_adapter
from .arch import (TESTED_FAMILIES, attn_implementation_of, cache_kwarg, check_config, decoder_attribute, layer_windows,
                   pick_attn_implementation)
from .attention import (CP_ATTENTION, CP_EAGER, DENSE_MASK_IMPLEMENTATIONS, UnsupportedModelError,
                        implementation_form)
from .context_parallel import gathers_so_far

log = logging.getLogger(__name__)

__all__ = ["DLMModel", "load_dlm", "resolve_mask_token", "untie_output_head", "MASK_TOKEN", "cache_kwarg",
           "UnsupportedModelError", "attn_implementation_of"]

MASK_TOKEN = "<|mask|>"


def resolve_mask_token(model, tokenizer, mask_token: int | str | None = None) -> int:
    """Find or create the diffusion mask token; returns its id.

    Args:
        mask_token: an int uses that id (e.g. a reserved slot, NLD uses 100); a string uses that
            token, which must exist in the tokenizer or is added; None uses ``<|mask|>`` (added
            when absent). An added token grows the embeddings (and untied head) by one row
            initialised to the mean row, so the new token starts as an "average" input.
    """
    vocab = model.get_input_embeddings().weight.shape[0]
    if isinstance(mask_token, int):
        if not 0 <= mask_token < vocab:
            raise ValueError(f"mask_token id {mask_token} is outside the model's vocabulary of {vocab} rows")
        return mask_token
    text = mask_token or MASK_TOKEN
    if tokenizer is None:
        raise ValueError(f"mask token {text!r} given by name but the model has no tokenizer; give an id instead")
    existing = tokenizer.convert_tokens_to_ids(text)
    if existing is not None and existing != tokenizer.unk_token_id and existing < vocab:
        return int(existing)
    # append: passing the list alone would REPLACE the tokenizer's other extra special tokens
    # (<|im_start|>, <|im_end|>...) in all_special_tokens and the saved tokenizer
    tokenizer.add_special_tokens({"additional_special_tokens": [text]}, replace_extra_special_tokens=False)
    new_id = tokenizer.convert_tokens_to_ids(text)
    if new_id >= vocab:
        _grow_vocab_with_mean_rows(model, new_id + 1)
    log.info("added mask token %r as id %d", text, new_id)
    return int(new_id)


@torch.no_grad()
def _grow_vocab_with_mean_rows(model, new_size: int) -> None:
    emb = model.get_input_embeddings()
    old = emb.weight.shape[0]
    mean_in = emb.weight.mean(dim=0, keepdim=True)
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb.weight
    mean_out = None if (out is None or tied) else out.weight.mean(dim=0, keepdim=True)
    model.resize_token_embeddings(new_size, mean_resizing=False)
    model.get_input_embeddings().weight[old:] = mean_in
    if mean_out is not None:
        model.get_output_embeddings().weight[old:] = mean_out


@torch.no_grad()
def untie_output_head(model) -> bool:
    """Give the output head its own copy of the input embedding (NLD trains an untied head).

    Returns True when the head was tied before.
    """
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is not emb.weight:
        model.config.tie_word_embeddings = False
        return False
    head.weight = nn.Parameter(emb.weight.detach().clone())
    model.config.tie_word_embeddings = False
    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text_cfg is not None:
        text_cfg.tie_word_embeddings = False
    # transformers re-ties on post_init/load when these keys are declared; the instance must not.
    if getattr(model, "_tied_weights_keys", None):
        model._tied_weights_keys = {} if isinstance(model._tied_weights_keys, dict) else []
    return True


@dataclass
class DLMSettings:
    """What makes an AR checkpoint a DLM; saved into exported configs (``nemodiff`` key)."""

    mask_token_id: int
    train_block_size: int = 64
    inference_block_size: int = 32
    attention_pattern: str = "two_stream"


class _GivenHidden(nn.Module):
    """Stands in for the decoder while :meth:`DLMModel.head` runs the model's forward on given hidden states."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        return BaseModelOutputWithPast(last_hidden_state=self.hidden)


class DLMModel(nn.Module):
    """A loaded HF causal LM plus the DLM settings; the unit both training and decoding use.

    Attributes:
        hf: the ``*ForCausalLM`` module (its ``state_dict`` is the HF layout, so export is a save).
        settings: :class:`DLMSettings`.
        adapter: the drafter :class:`~nemodiff_train.models.adapter.DrafterAdapter` when one is attached
            (:meth:`add_adapter`; the base is then frozen), else None.
        windows: :class:`~nemodiff_train.models.arch.LayerWindows` of the decoder's layers.
    Raises:
        UnsupportedModelError: the model's attention implementation, layer types or module layout
            cannot be run correctly.
    """

    def __init__(self, hf: nn.Module, settings: DLMSettings, tokenizer=None):
        super().__init__()
        self.hf = hf
        self.settings = settings
        self.tokenizer = tokenizer
        self._cache_kw = cache_kwarg(hf.get_decoder())
        attn_implementation_of(hf)  # refuse a kernel that cannot take our masks now, not at the first step
        self.windows = layer_windows(hf.config, hf.get_decoder())
        self._decoder_name = decoder_attribute(hf)
        self.adapter: DrafterAdapter | None = None

    def add_adapter(self, **settings) -> DrafterAdapter:
        """Freeze the base and attach a drafter adapter (``rank``, ``alpha``, ``dropout``, ``target_modules``:
        :func:`~nemodiff_train.models.adapter.attach_adapter`); it becomes a submodule, so it trains and
        data-parallel wrappers see its parameters."""
        self.adapter = attach_adapter(self.hf, self.settings.mask_token_id, **settings)
        return self.adapter

    @property
    def config(self):
        return self.hf.config

    @property
    def implementation(self) -> str:
        """The attention implementation the model runs now (read per call: tools may switch it)."""
        return attn_implementation_of(self.hf)

    @property
    def backbone(self) -> nn.Module:
        return self.hf.get_decoder()

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output head: ``[..., d]`` final hidden states → ``[..., V]`` logits, by the model's own forward.

        The ``*ForCausalLM.forward`` runs with its decoder replaced by a module that returns ``hidden``,
        so everything the architecture does after the decoder (the head, logit scaling, soft-capping)
        is the architecture's own code, not a re-implementation of the common case.
        """
        lead, d = hidden.shape[:-1], hidden.shape[-1]
        flat = hidden.reshape(1, -1, d)
        modules = self.hf._modules
        decoder = modules[self._decoder_name]
        modules[self._decoder_name] = _GivenHidden(flat)
        try:
            logits = self.hf(inputs_embeds=flat, use_cache=False).logits
        finally:
            modules[self._decoder_name] = decoder
        return logits.reshape(*lead, logits.shape[-1])

    def attention_mask(self, layout: SequenceLayout, batch_size: int, device: torch.device, pattern: str | None = None,
                       query_index: torch.Tensor | None = None):
        """The prepared 4-D mask in the form this model's attention implementation reads.

        Args:
            query_index: optional ``[q]`` row positions: only those query rows (a context-parallel
                rank's, :meth:`two_stream_hidden`); dense forms only.
        Returns:
            one mask (every layer has the same window), or ``{layer type: mask}`` when layers differ;
            each a ``[b, 1, S, S]`` (``[b, 1, q, S]``) bool (sdpa) or model-dtype additive float (eager)
            tensor, or a flex-attention ``BlockMask``.
        """
        pattern = get_pattern(pattern or self.settings.attention_pattern)
        dtype = self.hf.get_input_embeddings().weight.dtype

        def build(window):
            if self.implementation == "flex_attention":
                if query_index is not None:
                    raise UnsupportedModelError("the mask of a context-parallel slice is built for sdpa or eager, "
                                                "not flex_attention")
                return flex_block_mask(pattern, layout, batch_size, device=device, window=window)
            return implementation_form(dense_mask(pattern, layout, batch_size, device=device, window=window,
                                                  query_index=query_index), self.implementation, dtype)

        return self._per_layer({w: build(w) for w in self._window_set()})

    def _window_set(self) -> set[int | None]:
        """The distinct sliding windows of the decoder's layers (None = unlimited)."""
        return set(self.windows.windows) if self.windows.windows else {None}

    def _per_layer(self, by_window: dict):
        """One mask (every layer has the same window) or ``{layer type: mask}``, from ``{window: mask}``."""
        if self.windows.uniform:
            return by_window[self.windows.windows[0] if self.windows.windows else None]
        return {t: by_window[w] for t, w in self.windows.by_type().items()}

    def two_stream_hidden(self, noisy_ids: torch.Tensor, clean_ids: torch.Tensor,
                          doc_ids: torch.Tensor | None = None, block_size: int | None = None,
                          pattern: str | None = None, shard=None, needed: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states of one two-stream forward, or of one context-parallel rank's slice of it.

        Args:
            noisy_ids, clean_ids: ``[b, L]`` (the whole rows, also under context parallelism: noise and
                positions are functions of the whole row); doc_ids: optional ``[b, L]``.
            shard: optional :class:`~nemodiff_train.models.context_parallel.ContextShard`: run only its
                row positions (their global position ids, the local query rows of the whole row's
                mask), attention gathering keys and values across its group. The model must run
                :data:`~.attention.CP_ATTENTION` or :data:`~.attention.CP_EAGER`
                (:func:`~.context_parallel.use_cp_attention`).
            needed: optional ``[b, 2L]`` bool, the positions whose hidden states the caller reads: only
                they and what they attend to are computed (:mod:`nemodiff_train.core.compaction`; dense
                masks, sdpa or eager); every other position's row is returned as zeros.
        Returns:
            ``[b, 2L, d]`` hidden states (noisy stream first), before the output head; with ``shard``
            ``[b, 2L/cp, d]``, those of ``shard.positions`` (its noisy positions, then its clean ones).
        """
        pattern_obj = get_pattern(pattern or self.settings.attention_pattern)
        if pattern_obj.streams != 2:
            raise ValueError(f"two_stream_hidden needs a two-stream pattern, got {pattern_obj.name!r}")
        b, length = clean_ids.shape
        layout = SequenceLayout(length, block_size or self.settings.train_block_size, doc_ids)
        inputs = two_stream_inputs(noisy_ids, clean_ids, doc_ids)
        rows = None if shard is None else shard.positions
        if needed is not None and rows is not None:
            raise ValueError("needed (a compacted forward) and shard (a context-parallel slice) cannot be combined")
        comp = None  # a Compaction when only the needed positions run
        if needed is None:
            mask = self.attention_mask(layout, b, clean_ids.device, pattern_obj.name, query_index=rows)
        else:
            comp, mask = self._compacted_mask(layout, pattern_obj, needed)
        if self.adapter is not None:
            # the drafter is on for the noisy half only: the clean half is the frozen base's causal pass,
            # the states the drafter reads from the KV cache at inference. The gate is left set after
            # the forward on purpose: activation checkpointing re-runs the layers in backward and must
            # see the same gate (every other caller sets its own gate, None included).
            noisy = torch.ones(b, length, dtype=torch.bool, device=clean_ids.device)
            gate = torch.cat([noisy, torch.zeros_like(noisy)], dim=1)  # [b, 2L]
            self.adapter.gate = gate[:, rows] if rows is not None else gate if comp is None else comp.gather(gate)
        if rows is None:
            ids, positions = inputs.input_ids, inputs.position_ids
            if comp is not None:
                ids, positions = comp.gather(ids), comp.gather(positions)
            out = self.backbone(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False)
            return out.last_hidden_state if comp is None else comp.scatter(out.last_hidden_state)
        if getattr(self.hf.config, "_attn_implementation", None) not in (CP_ATTENTION, CP_EAGER):
            raise UnsupportedModelError(f"a context-parallel forward needs attn_implementation {CP_ATTENTION!r} or "
                                        f"{CP_EAGER!r} (models.context_parallel.use_cp_attention)")
        before = gathers_so_far()
        out = self.backbone(input_ids=inputs.input_ids[:, rows], position_ids=inputs.position_ids[:, rows],
                            attention_mask=mask, use_cache=False, context_shard=shard)
        layers, done = len(self.windows.windows), gathers_so_far() - before
        if shard.split.cp > 1 and done != 2 * layers:
            # an attention module that bypasses transformers' attention interface never saw the other ranks' keys
            raise UnsupportedModelError(
                f"{type(self.hf).__name__}: {done} key/value gathers in a context-parallel "
                f"forward of {layers} layers (expected {2 * layers}): its attention does not run through "
                "transformers' attention interface, so engine.cp cannot split its rows")
        return out.last_hidden_state

    def _compacted_mask(self, layout: SequenceLayout, pattern, needed: torch.Tensor):
        """``(compaction, mask)`` of a forward over the positions ``needed`` depends on; ``(None, the whole
        rows' mask)`` when that would leave out under 1/16 of them."""
        impl = self.implementation
        if impl not in DENSE_MASK_IMPLEMENTATIONS:
            raise UnsupportedModelError(f"a compacted two-stream forward takes a dense mask (sdpa or eager), "
                                        f"not attn_implementation={impl!r}")
        b, device = needed.shape[0], needed.device
        dense = {w: dense_mask(pattern, layout, b, device=device, window=w) for w in self._window_set()}
        comp = Compaction.of(required_positions(functools.reduce(torch.logical_or, dense.values()), needed))
        if comp.width * 16 > comp.length * 15:
            # under 1/16 shorter (packed pretraining rows: every row keeps nearly all): the gathers would
            # cost more than they save, so the whole rows run (measured: 0.96x at no saving)
            comp = None
        dtype = self.hf.get_input_embeddings().weight.dtype
        return comp, self._per_layer({w: implementation_form(m if comp is None else comp.mask(m), impl, dtype)
                                      for w, m in dense.items()})

    def causal_hidden(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states ``[b, L, d]`` of a causal pass over ``input_ids`` ``[b, L]``, adapter off.

        Packed rows (``doc_ids`` ``[b, L]``) restart positions at every document and attend within it,
        exactly like the clean stream of :meth:`two_stream_hidden`; this is the teacher's forward of
        the teacher-KL term (:mod:`nemodiff_train.core.distill_losses`).
        """
        b, length = input_ids.shape
        docs = doc_ids if doc_ids is not None else torch.zeros_like(input_ids)
        layout = SequenceLayout(length, self.settings.train_block_size, docs)
        mask = self.attention_mask(layout, b, input_ids.device, "causal")
        with adapter_tokens(self.hf, None):
            out = self.backbone(input_ids=input_ids, position_ids=document_positions(docs), attention_mask=mask,
                                use_cache=False)
        return out.last_hidden_state

    def causal_logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Plain AR logits ``[b, L, V]`` of the unmodified model (reference for tests; adapter off)."""
        with adapter_tokens(self.hf, None):
            return self.hf(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def load_dlm(path: str | Path, *, mask_token: int | str | None = None, untie_head: bool = True,
             dtype: torch.dtype = torch.float32, attn_implementation: str | None = None,
             device: str | torch.device = "cpu", settings: dict | None = None) -> DLMModel:
    """Load an HF causal LM from a local directory and make it a DLM.

    Args:
        path: local HF directory (config.json, weights, tokenizer).
        mask_token: see :func:`resolve_mask_token`; ignored when the directory's config already
            records a ``nemodiff.mask_token_id`` (an exported DLM).
        untie_head: give the output head its own weights when the base ties them.
        attn_implementation: ``sdpa``, ``eager`` or ``flex_attention``; None picks the first the
            architecture supports (:func:`~nemodiff_train.models.arch.pick_attn_implementation`:
            flex_attention on CUDA, else sdpa, else eager).
        settings: extra :class:`DLMSettings` fields (block sizes, pattern).
    Raises:
        FileNotFoundError: no ``config.json`` in ``path``.
        UnsupportedModelError: an architecture, layer type or attention implementation that cannot be
            run correctly (the message names it).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    device = torch.device(device)
    config = AutoConfig.from_pretrained(path)
    check_config(config)
    attn_implementation = pick_attn_implementation(config, device.type, attn_implementation)
    family = getattr(config, "model_type", "?")
    if family not in TESTED_FAMILIES:
        log.warning("model family %r is not in the tested set %s; trying anyway", family, TESTED_FAMILIES)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    hf.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path) if _has_tokenizer(path) else None
    recorded = getattr(config, "nemodiff", None) or {}
    merged = {**recorded, **(settings or {})}
    if "mask_token_id" in recorded:
        mask_id = int(recorded["mask_token_id"])
    else:
        mask_id = resolve_mask_token(hf, tokenizer, mask_token)
    if untie_head:
        untie_output_head(hf)
    merged["mask_token_id"] = mask_id
    known = {f for f in DLMSettings.__dataclass_fields__}
    return DLMModel(hf, DLMSettings(**{k: v for k, v in merged.items() if k in known}), tokenizer)


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
