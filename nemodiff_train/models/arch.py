"""What the toolkit must know about a transformers decoder, and what it refuses, before using it.

* the attention implementation: one whose kernel takes the prepared masks (``sdpa``, ``eager``,
  ``flex_attention``) and that the architecture's transformers class supports (Gemma-2: no sdpa);
* the sliding window of every layer (``sliding_window`` plus ``layer_types``), so the two-stream and
  decoding masks apply it exactly where the base model does; layer types other than full and sliding
  attention (chunked, linear, recurrent...) are refused;
* where the decoder sits in the ``*ForCausalLM`` module, so the output head can be the model's own
  ``forward`` after the decoder (:meth:`~nemodiff_train.models.hf.DLMModel.head`).

Tested families (tests/integration/test_arch_matrix.py): :data:`TESTED_FAMILIES`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from .attention import SUPPORTED_IMPLEMENTATIONS, UnsupportedModelError, check_implementation, mask_form

__all__ = ["TESTED_FAMILIES", "LayerWindows", "layer_windows", "causal_lm_class", "check_config",
           "pick_attn_implementation", "decoder_attribute", "cache_kwarg", "attn_implementation_of"]

TESTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "olmo2", "granite", "gemma2")
FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class LayerWindows:
    """Sliding window of every decoder layer.

    Attributes:
        windows: per layer, the window W (a query sees keys fewer than W positions behind it) or None.
        layer_types: the ``config.layer_types`` names when layers differ (the keys of the per-type mask
            dict transformers' decoders index); None when every layer has the same window.
    """

    windows: tuple[int | None, ...]
    layer_types: tuple[str, ...] | None = None

    @property
    def uniform(self) -> bool:
        return self.layer_types is None

    def by_type(self) -> dict[str, int | None]:
        """``{layer type: window}`` (mixed layers only)."""
        assert self.layer_types is not None
        return dict(zip(self.layer_types, self.windows))


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _source(obj) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def layer_windows(config, backbone=None) -> LayerWindows:
    """The sliding window of each layer, as the base model applies it.

    Args:
        config: the model config.
        backbone: the decoder module, when loaded: its ``forward`` source says whether it builds a
            sliding-window mask at all (a config may carry ``sliding_window`` its model ignores) and
            whether it takes one mask per layer type.
    Raises:
        UnsupportedModelError: unknown layer types, or layers with different windows in a decoder that
            takes a single mask for all layers.
    """
    text = _text_config(config)
    family = getattr(config, "model_type", "?")
    n = int(getattr(text, "num_hidden_layers"))
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    forward_src = _source(type(backbone).forward) if backbone is not None else ""
    if types is None:
        if window is None:
            return LayerWindows((None,) * n)
        if backbone is not None and forward_src and "sliding_window" not in forward_src:
            return LayerWindows((None,) * n)  # the config carries a window this model never applies
        return LayerWindows((int(window),) * n)
    types = tuple(types)
    unknown = sorted(set(types) - {FULL, SLIDING})
    if unknown:
        raise UnsupportedModelError(
            f"{family}: layer types {unknown} are not supported (only {FULL!r} and {SLIDING!r} layers: their "
            "masks can be expressed for the two-stream training row and the decoders)")
    if SLIDING in types and window is None:
        raise UnsupportedModelError(f"{family}: config.layer_types has {SLIDING!r} layers but sliding_window is None")
    windows = tuple(int(window) if t == SLIDING else None for t in types)
    if len(set(windows)) <= 1:
        return LayerWindows(windows)
    # transformers' decoders with per-type masks open with `if not isinstance(... attention_mask, dict):`
    if backbone is not None and forward_src and "attention_mask, dict)" not in forward_src:
        raise UnsupportedModelError(
            f"{family}: layers have different sliding windows but {type(backbone).__name__}.forward takes one "
            "attention mask for all layers, so the per-layer windows cannot be applied")
    return LayerWindows(windows, types)


def cache_kwarg(module) -> str:
    """Name of the KV-cache argument of a transformers forward (``cache`` in v5.x, ``past_key_values`` before)."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def attn_implementation_of(hf) -> str:
    """The attention implementation a loaded model runs (checked: one whose kernel takes our masks); a
    function this toolkit registered reads as the implementation whose masks it takes
    (:data:`~.attention.MASK_FORM_OF`: the context-parallel attention is ``sdpa``)."""
    return mask_form(getattr(hf.config, "_attn_implementation", None) or "eager")


def causal_lm_class(config):
    """The transformers ``*ForCausalLM`` class of a config; refuses architectures without one."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    family = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"model_type {family!r} is an encoder-decoder; only decoder-only causal LMs "
                                    "can be converted")
    if family in MODEL_FOR_MASKED_LM_MAPPING_NAMES:  # BERT-like encoders also register a causal-LM head
        raise UnsupportedModelError(f"model_type {family!r} is an encoder (it has a masked-LM class); only "
                                    "decoder-only causal LMs can be converted")
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(family)
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise UnsupportedModelError(f"model_type {family!r} has no causal-LM class in transformers "
                                    f"{transformers.__version__} (supported and tested: {', '.join(TESTED_FAMILIES)})")
    return cls


def _supports(cls, implementation: str, config=None) -> bool:
    if implementation == "eager":
        return True
    if implementation == "sdpa" and getattr(config, "attn_logit_softcapping", None) is not None:
        # sdpa has no logit softcapping; transformers < 5.21 still declared sdpa for Gemma-2 (and dropped it)
        return False
    flag = {"sdpa": "_supports_sdpa", "flex_attention": "_supports_flex_attn"}[implementation]
    return bool(getattr(cls, flag, False))


def pick_attn_implementation(config, device_type: str, requested: str | None = None, *,
                             training: bool = True) -> str:
    """The attention implementation to load ``config``'s model with.

    ``requested`` is checked (a kernel that takes our masks, supported by the architecture). Without
    one: flex_attention when training on CUDA, else sdpa, else eager, the first the architecture's
    transformers class supports (Gemma-2 declares no sdpa: it runs eager on a CPU).
    """
    cls = causal_lm_class(config)
    family = getattr(config, "model_type", "?")
    if requested is not None:
        check_implementation(requested)
        if not _supports(cls, requested, config):
            others = [i for i in SUPPORTED_IMPLEMENTATIONS if _supports(cls, i, config)]
            raise UnsupportedModelError(f"attn_implementation={requested!r}: {cls.__name__} ({family}) does not support "
                                        f"it in transformers; use one of {others}")
        return requested
    order = ("flex_attention", "sdpa", "eager") if (device_type == "cuda" and training) else ("sdpa", "eager")
    return next(i for i in order if _supports(cls, i, config))


def check_config(config, attn_implementation: str | None = None) -> None:
    """Refuse, before any weights load, a config this toolkit cannot run correctly (see the module docstring)."""
    causal_lm_class(config)
    if attn_implementation is not None:
        pick_attn_implementation(config, "cpu", attn_implementation)
    layer_windows(config)


def decoder_attribute(hf) -> str:
    """Name of the child module of ``hf`` that is its decoder (``model`` for most families)."""
    decoder = hf.get_decoder()
    for name, child in hf.named_children():
        if child is decoder:
            return name
    raise UnsupportedModelError(f"{type(hf).__name__}: its decoder is not a direct child module, so the output head "
                                "cannot be run as the model's own forward")
