"""HF AR checkpoint → Megatron model provider with the two-stream attention.

Flow (docs/method.md, "Parameterisation"):

1. :func:`prepare_init_checkpoint` — the HF directory training starts from. The source directory is
   used as is when the mask token id is in range and the head is already untied (Ministral-3 8B/14B
   with the reserved id 100). Otherwise rank 0 writes ``<run.dir>/megatron/hf_init``: a text model is
   made a DLM by :func:`nemodiff_train.models.hf.load_dlm` (the torch engine's exact code: added mask
   token row = mean row, untied head = copy of the embedding), a multimodal checkpoint
   (``*ForConditionalGeneration``, e.g. Ministral-3 3B) is untied tensor by tensor.
2. :func:`build_provider` — ``AutoBridge`` maps the HF config to a Megatron ``GPTModelProvider``
   (Llama, Qwen2/3, Mistral, Ministral-3, ... whatever the bridge registers), and we set
   ``position_embedding_type="none"``, our layer spec, parallelism, recompute and per-token loss.
   Weights are not loaded here: the first job loads the HF directory through
   ``checkpoint.pretrained_checkpoint`` (see :mod:`.config`).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from ... import runs
from ...assets.resolve import resolve_model_path
from ...config.schema import Config
from .attention import SETTINGS_ATTR, rope_settings, two_stream_layer_spec

log = logging.getLogger(__name__)

__all__ = ["prepare_init_checkpoint", "needs_conversion", "build_provider", "provider_overrides", "dlm_record",
           "hf_config_of", "auto_bridge"]

DONE = "NEMODIFF_INIT_DONE"


def hf_config_of(path: str | Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path))


def _text(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _is_multimodal(config) -> bool:
    return getattr(config, "text_config", None) is not None and _text(config) is not config


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception:  # no tokenizer files
        return None


UNTIE = "untie the output head"


def _conversion_reasons(cfg: Config, src: Path) -> list[str]:
    hf = hf_config_of(src)
    text = _text(hf)
    vocab = int(text.vocab_size)
    reasons = []
    tied = bool(getattr(text, "tie_word_embeddings", getattr(hf, "tie_word_embeddings", False))) or bool(
        getattr(hf, "tie_word_embeddings", False))
    if cfg.model.untie_head and tied:
        reasons.append(UNTIE)
    if cfg.model.mask_token_id is not None:
        if not 0 <= cfg.model.mask_token_id < vocab:
            reasons.append(f"mask_token_id {cfg.model.mask_token_id} is outside the vocabulary ({vocab})")
    else:
        tok = _tokenizer(src)
        tid = tok.convert_tokens_to_ids(cfg.model.mask_token) if tok is not None else None
        if tid is None or (tok is not None and tid == tok.unk_token_id) or tid >= vocab:
            reasons.append(f"add the mask token {cfg.model.mask_token!r}")
    return reasons


def needs_conversion(cfg: Config, src: Path) -> tuple[bool, str]:
    """Whether the source checkpoint must be rewritten before Megatron can start from it, and why."""
    reasons = _conversion_reasons(cfg, src)
    return bool(reasons), "; ".join(reasons)


def dlm_record(cfg: Config, mask_token_id: int) -> dict[str, Any]:
    """The ``nemodiff`` dict written into exported ``config.json`` files (:func:`nemodiff_train.runs.run_record`)."""
    return runs.run_record(cfg, mask_token_id, engine="megatron")


def mask_token_id_of(cfg: Config, hf_dir: Path) -> int:
    """The mask id a prepared HF directory uses (recorded in its config, or the configured one)."""
    rec = getattr(hf_config_of(hf_dir), "nemodiff", None) or {}
    if "mask_token_id" in rec:
        return int(rec["mask_token_id"])
    if cfg.model.mask_token_id is not None:
        return int(cfg.model.mask_token_id)
    tok = _tokenizer(hf_dir)
    tid = tok.convert_tokens_to_ids(cfg.model.mask_token) if tok is not None else None
    if tid is None:
        raise ValueError(f"{hf_dir}: cannot find the mask token {cfg.model.mask_token!r}")
    return int(tid)


def prepare_init_checkpoint(cfg: Config, run_dir: Path, is_main: bool, barrier=None, src: Path | None = None) -> Path:
    """The HF directory the first stage loads (see the module docstring). Collective when ``barrier`` is given."""
    src = src or resolve_model_path(cfg.model.path, cfg.model.revision)
    if cfg.engine.init_from == "random":
        return _random_init_source(cfg, src)
    out = runs.megatron_init_dir(run_dir)
    if (out / DONE).is_file():
        return out
    convert, why = needs_conversion(cfg, src)
    if not convert:
        return src
    if is_main:
        log.info("writing %s from %s (%s)", out, src, why)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if _is_multimodal(hf_config_of(src)):
            _untie_multimodal(cfg, src, tmp)
        else:
            _dlm_ify_text_model(cfg, src, tmp)
        (tmp / DONE).write_text(f"source: {src}\nwhy: {why}\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    if barrier is not None:
        barrier()
    else:
        while not (out / DONE).is_file():  # other ranks without a process group yet: wait for rank 0's file
            time.sleep(2)
    return out


def _random_init_source(cfg: Config, src: Path) -> Path:
    """``engine.init_from=random``: ``src`` is used as is (config + tokenizer; weights, if any, are not
    read). An untied head is the provider's setting; a mask token outside the vocabulary cannot be
    added without weights to extend, so it is refused."""
    from ...config.errors import ConfigError

    problems = [r for r in _conversion_reasons(cfg, src) if r != UNTIE]
    if problems:
        raise ConfigError(f"engine.init_from=random: {src} would need to {'; '.join(problems)}, which needs weights; "
                          "set model.mask_token_id to an id inside the vocabulary")
    return src


def _dlm_ify_text_model(cfg: Config, src: Path, out: Path) -> None:
    import torch

    from ...models.dtypes import torch_dtype
    from ...models.hf import load_dlm

    mask = cfg.model.mask_token_id if cfg.model.mask_token_id is not None else cfg.model.mask_token
    dtype = torch_dtype(cfg.model.dtype)
    dlm = load_dlm(src, mask_token=mask, untie_head=cfg.model.untie_head, dtype=dtype)
    dlm.hf.config.nemodiff = dlm_record(cfg, dlm.settings.mask_token_id)
    dlm.hf.save_pretrained(out)
    if dlm.tokenizer is not None:
        dlm.tokenizer.save_pretrained(out)


def _untie_multimodal(cfg: Config, src: Path, out: Path) -> None:
    """Copy a multimodal checkpoint with ``lm_head`` = a copy of the embedding (no model load)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    hf = hf_config_of(src)
    vocab = int(_text(hf).vocab_size)
    if cfg.model.mask_token_id is None or not 0 <= cfg.model.mask_token_id < vocab:
        raise ValueError("multimodal checkpoints (e.g. Ministral-3) need model.mask_token_id set to a reserved id "
                         f"inside the vocabulary (NLD uses 100); got {cfg.model.mask_token_id}")
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out / f.name)
    files = sorted(src.glob("*.safetensors"))
    embed_key = None
    tensors_out = 0
    weight_map = {}
    for i, f in enumerate(files):
        with safe_open(str(f), "pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        for k in tensors:
            if k.endswith("embed_tokens.weight") and "vision" not in k:
                embed_key = (k, tensors[k])
        name = f"model-{i + 1:05d}-of-{len(files) + 1:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        tensors_out += len(tensors)
    if embed_key is None:
        raise ValueError(f"{src}: no embed_tokens.weight found to untie the head from")
    k, emb = embed_key
    head_key = _head_key(k)
    name = f"model-{len(files) + 1:05d}-of-{len(files) + 1:05d}.safetensors"
    save_file({head_key: emb.clone()}, str(out / name), metadata={"format": "pt"})
    weight_map[head_key] = name
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    conf = json.loads((src / "config.json").read_text())
    conf["tie_word_embeddings"] = False
    if isinstance(conf.get("text_config"), dict):
        conf["text_config"]["tie_word_embeddings"] = False
    conf["nemodiff"] = dlm_record(cfg, cfg.model.mask_token_id)
    (out / "config.json").write_text(json.dumps(conf, indent=2))


def _head_key(embed_key: str) -> str:
    """The output-head tensor name that goes with an embedding tensor name, for the known layouts."""
    if embed_key.startswith("model.language_model."):  # transformers >= 5: model.language_model.* + lm_head
        return "lm_head.weight"
    if embed_key.startswith("language_model.model."):  # transformers 4: language_model.{model.*, lm_head}
        return "language_model.lm_head.weight"
    if embed_key.startswith("model."):
        return "lm_head.weight"
    raise ValueError(f"unknown checkpoint layout: cannot place the output head next to {embed_key!r}")


def auto_bridge(hf_dir: str | Path | None = None, hf_config=None):
    """``AutoBridge`` from a directory (config + lazily weights) or from a config object alone."""
    from megatron.bridge import AutoBridge

    if hf_config is not None:
        return AutoBridge.from_hf_config(hf_config)
    return AutoBridge.from_hf_pretrained(str(hf_dir))


def _have_te() -> bool:
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except Exception:
        return False
    return bool(HAVE_TE)


def build_provider(cfg: Config, bridge, stage_index: int, *, cpu: bool = False):
    """The Megatron model provider of stage ``stage_index`` (no weights loaded), with its final values.

    The provider is constructed inside megatron-bridge (``provider_bridge`` maps the HF config), so
    our values cannot go to its constructor; they are applied in one place,
    ``apply_overrides_and_finalize`` (the bridge's own API for this: every name must be an existing
    attribute, then the deferred ``TransformerConfig`` post-init runs once on the final values).
    ``dataclasses.replace`` is not used: it would drop what the bridge attached after construction
    (``hf_model_id``, pre-wrap hooks) and re-run the post-init on already-derived fields.

    Args:
        cpu: fp32 parameters whatever ``engine.precision`` says (the CPU tier; gloo has no bf16 path).
    """
    from megatron.core.transformer.enums import AttnBackend

    provider = bridge.to_megatron_provider(load_weights=False)
    hf = getattr(bridge.hf_pretrained, "config", bridge.hf_pretrained)
    overrides = provider_overrides(cfg, hf, stage_index, cpu=cpu,
                                   local_attention=provider.attention_backend == AttnBackend.local,
                                   multimodal=hasattr(provider, "freeze_vision_model"))
    settings = overrides.pop(SETTINGS_ATTR)  # not a provider field: the two-stream layer spec reads it
    setattr(provider, SETTINGS_ATTR, settings)
    provider.apply_overrides_and_finalize(overrides=overrides)
    vocab = int(provider.vocab_size)
    if vocab % cfg.engine.tp:
        raise ValueError(f"the vocabulary ({vocab} rows) is not divisible by engine.tp={cfg.engine.tp}; use a reserved "
                         "model.mask_token_id inside the vocabulary instead of adding a token")
    return provider


_FUSIONS = ("gradient_accumulation_fusion", "masked_softmax_fusion", "bias_activation_fusion", "persist_layer_norm",
            "apply_rope_fusion", "bias_dropout_fusion", "cross_entropy_loss_fusion")


_RECOMPUTE: dict[str | None, dict[str, Any]] = {  # engine.recompute -> the provider's activation recomputation
    None: {},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
}


def provider_overrides(cfg: Config, hf, stage_index: int, *, cpu: bool = False, local_attention: bool = False,
                       multimodal: bool = False) -> dict[str, Any]:
    """Every provider value this engine sets, by attribute name (:func:`build_provider` applies them).

    Args:
        hf: the HF config the provider was mapped from.
        local_attention: the bridge chose ``AttnBackend.local``, which would swap our core attention
            back out: ``auto`` instead.
        multimodal: a multimodal wrapper (Ministral-3): freeze the vision tower, train the language model.
    """
    import torch
    from megatron.core.transformer.enums import AttnBackend

    e = cfg.engine
    stage = cfg.stages[stage_index]
    use_te = e.transformer_impl == "transformer_engine" or (e.transformer_impl == "auto" and _have_te())
    bf16 = e.precision in ("bf16", "auto") and e.device != "cpu" and not cpu
    dtype = torch.bfloat16 if bf16 else torch.float32
    if e.recompute not in (None, "selective", "full"):
        raise ValueError(f"engine.recompute: {e.recompute!r} is not one of [null, selective, full]")
    values: dict[str, Any] = {
        SETTINGS_ATTR: {
            "pattern": cfg.diffusion.pattern,
            "block_size": cfg.diffusion.block_size,
            "attention_backend": e.megatron_attention,
            "transformer_impl": "transformer_engine" if use_te else "local",
            "rope": rope_settings(hf),
        },
        "transformer_layer_spec": two_stream_layer_spec,
        "position_embedding_type": "none",  # RoPE is applied per half by TwoStreamCoreAttention
        "share_embeddings_and_output_weights": bool(getattr(_text(hf), "tie_word_embeddings", False))
        and not cfg.model.untie_head,
        "seq_length": 2 * stage.data.seq_len,  # the network runs on [x_t ; x_0]
        "tensor_model_parallel_size": e.tp,
        "pipeline_model_parallel_size": e.pp,
        "context_parallel_size": e.cp,
        "expert_model_parallel_size": e.ep,
        "sequence_parallel": e.sequence_parallel and e.tp > 1,
        "calculate_per_token_loss": True,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "bf16": bf16,
        "fp16": False,
        "params_dtype": dtype,
        "pipeline_dtype": dtype,
        # random initialisation (engine.init_from=random) needs it; with init_from=hf the loaded weights
        # overwrite the initialised ones (the bridge's default, kept)
        "perform_initialization": True,
    }
    if local_attention:
        values["attention_backend"] = AttnBackend.auto
    values.update(copy.deepcopy(_RECOMPUTE[e.recompute]))
    if not use_te:  # fused kernels that need Transformer Engine / apex / Megatron's CUDA extensions
        values["transformer_impl"] = "local"
        values.update({name: False for name in _FUSIONS})
    if multimodal:
        values.update(freeze_vision_model=True, freeze_vision_projection=True)
    return values
