"""Hydra composition → validated :class:`~nemodiff_train.config.schema.Config`.

The ``conf/`` directory holds the config groups; ``conf/recipe`` points at the top-level
``recipes/`` folder so that ``recipe=<name>`` selects a named experiment (a ``@package _global_``
file that overrides any group). Every error names the key it is about.

Where ``conf/`` is (:data:`CONF_DIR`, the one definition every CLI uses): an installed wheel carries a
copy as ``nemodiff_train/_configs/conf`` (``setup.py`` copies ``conf/`` and ``recipes/`` there at build
time); a clone or an editable install reads the top-level ``conf/`` and ``recipes/`` directly, so
edits there take effect without reinstalling. A user's own configs are added with Hydra's
``--config-dir <dir>`` (CLIs) or ``hydra.searchpath=[file://<dir>]`` (also :func:`compose`):
``<dir>/recipe/<name>.yaml`` is then ``recipe=<name>``.
"""

from __future__ import annotations

import math
from dataclasses import fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from .schema import STAGE_KINDS, Config

__all__ = ["ConfigError", "CONF_DIR", "APPS_CONF_DIR", "RECIPES_DIR", "to_config", "validate", "compose",
           "save_config", "load_saved_config", "list_recipes"]


def _config_dirs() -> tuple[Path, Path]:
    """``(conf dir, recipes dir)``: the wheel's packaged copy when there is one, else the clone's folders."""
    packaged = Path(str(resources.files("nemodiff_train"))) / "_configs" / "conf"
    if (packaged / "config.yaml").is_file():
        return packaged, packaged / "recipe"  # the build copies recipes/ into conf/recipe (no symlink)
    clone = Path(__file__).resolve().parents[2]
    return clone / "conf", clone / "recipes"


CONF_DIR, RECIPES_DIR = _config_dirs()
# conf/apps/ holds the group-free configs of the single-purpose CLIs (nemodiff-eval, -export, -bench): in
# conf/ itself, `model=<dir>` or `checkpoint=<dir>` would be read as a choice of a training config group.
APPS_CONF_DIR = CONF_DIR / "apps"


class ConfigError(ValueError):
    """An invalid configuration; the message names the offending key."""


def to_config(cfg: DictConfig | dict) -> Config:
    """Merge a composed config into the typed schema; unknown keys and wrong types raise ConfigError."""
    raw = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    raw = OmegaConf.masked_copy(raw, [k for k in raw.keys() if k != "hydra"]) if "hydra" in raw else raw
    _reject_unknown_keys(OmegaConf.to_container(raw, resolve=False), Config, "")
    _refuse_secret_env(OmegaConf.to_container(raw, resolve=False))
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, raw)
        result = OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        raise ConfigError(f"unknown config key {_key_of(e)!r} (check its spelling): {e.msg}") from None
    except OmegaConfBaseException as e:
        key, msg = _find_bad_key(Config, OmegaConf.to_container(raw, resolve=False), "") or (_key_of(e), e.msg)
        raise ConfigError(f"invalid value for config key {key!r}: {msg}") from None
    validate(result)
    return result


def _refuse_secret_env(node: Any) -> None:
    """A recipe may not pull a secret from the environment: it would be saved in config.yaml, the W&B
    config and the export's nemodiff record (:mod:`.secrets`)."""
    from .secrets import secret_env_interpolations

    for key, var in secret_env_interpolations(node):
        raise ConfigError(f"config key {key!r} reads the secret environment variable {var!r} (${{oc.env:{var}}}): "
                          "secrets never go into a config, which is saved with the run; the tools that need "
                          "them (huggingface_hub, wandb) read HF_TOKEN / WANDB_API_KEY from the environment")


def _find_bad_key(schema: type, node: Any, prefix: str) -> tuple[str, str] | None:
    """The full dotted key (list items included: ``stages.0.micro_batch_size``) whose value does not
    fit ``schema``, and OmegaConf's message; OmegaConf's own errors lose the prefix inside lists."""
    import typing

    if not isinstance(node, dict):
        return None
    hints = typing.get_type_hints(schema)
    for key, value in node.items():
        sub = hints.get(key)
        item = typing.get_args(sub)[0] if typing.get_origin(sub) is list and typing.get_args(sub) else None
        if is_dataclass(sub) and isinstance(value, dict):
            found = _find_bad_key(sub, value, f"{prefix}{key}.")
        elif item is not None and is_dataclass(item) and isinstance(value, list):
            found = next((f for i, v in enumerate(value) if (f := _find_bad_key(item, v, f"{prefix}{key}.{i}."))), None)
        else:
            try:
                OmegaConf.merge(OmegaConf.structured(schema), {key: value})
                found = None
            except OmegaConfBaseException as e:
                found = (prefix + str(key), e.msg.splitlines()[0] if e.msg else type(e).__name__)
        if found:
            return found
    return None


def merge_into(schema: type, cfg: DictConfig | dict, *, app: str, error: type[Exception]):
    """Merge a composed config into a flat dataclass ``schema`` (the eval/export CLIs' configs).

    Unknown keys, missing mandatory values and bad values raise ``error`` naming the key and ``app``.
    """
    raw = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    if "hydra" in raw:
        raw = OmegaConf.masked_copy(raw, [k for k in raw.keys() if k != "hydra"])
    valid = ", ".join(f.name for f in fields(schema))
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), raw))
    except ConfigKeyError as e:
        raise error(f"unknown {app} key {e.full_key!r} (check its spelling; valid keys: {valid})") from None
    except MissingMandatoryValue as e:
        raise error(f"{app} needs {e.full_key}=<...>") from None
    except OmegaConfBaseException as e:
        raise error(f"invalid value for {app} key {e.full_key!r}: {e.msg.splitlines()[0]}") from None


def _reject_unknown_keys(node: Any, schema: type, prefix: str) -> None:
    """Walk the composed tree against the dataclasses: Hydra's ``+key=`` appends even to typed nodes."""
    import typing

    if not isinstance(node, dict):
        return
    hints = typing.get_type_hints(schema)
    for key, value in node.items():
        if key not in hints:
            raise ConfigError(f"unknown config key {prefix + str(key)!r} (check its spelling); "
                              f"known keys here: {sorted(hints)}")
        sub = hints[key]
        origin = typing.get_origin(sub)
        if is_dataclass(sub):
            _reject_unknown_keys(value, sub, f"{prefix}{key}.")
        elif origin is list and isinstance(value, list):
            (item_type,) = typing.get_args(sub) or (None,)
            if item_type is not None and is_dataclass(item_type):
                for i, item in enumerate(value):
                    _reject_unknown_keys(item, item_type, f"{prefix}{key}.{i}.")


def _key_of(e: OmegaConfBaseException) -> str:
    return str(getattr(e, "full_key", None) or getattr(e, "key", None) or "?")


_CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "diffusion.schedule": ("uniform", "position_dependent"),
    "optim.name": ("adamw",),
    "schedule.name": ("wsd", "cosine", "constant"),
    "engine.name": ("torch", "megatron"),
    "engine.device": ("auto", "cpu", "cuda"),
    "engine.precision": ("auto", "fp32", "bf16"),
    "engine.distributed": ("ddp", "fsdp2", None),  # None: the Megatron engine (conf/engine/megatron.yaml)
    "engine.transformer_impl": ("auto", "local", "transformer_engine"),
    "engine.megatron_attention": ("auto", "flex", "sdpa"),
    "engine.init_from": ("hf", "random"),
    "logging.wandb.mode": ("online", "offline", "disabled"),
    "export.dtype": ("float32", "bfloat16"),
    "adapter.name": ("none", "lora"),
}


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> None:
    """Reject impossible values, naming the key (section by section, in this order)."""
    for check in (_check_values, _check_optim, _check_evaluation, _check_diffusion, _check_stages,
                  _check_lr_schedule, _check_checkpoint_and_logging, _check_engine, _check_adapter,
                  _check_runtime):
        check(cfg)


def _need(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _check_values(cfg: Config) -> None:
    """Enumerated keys, finite floats, and the top-level numbers."""
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        _need(value in choices, key, f"{value!r} is not one of {list(choices)}")
    for key, value in _float_leaves(cfg, ""):
        _need(math.isfinite(value), key, f"{value} is not a finite number")
    _need(cfg.run.seed >= 0, "run.seed", "must be >= 0")
    _need(cfg.model.mask_token_id is None or cfg.model.mask_token_id >= 0, "model.mask_token_id", "must be >= 0")
    _need(cfg.diffusion.loss_chunk_size > 0, "diffusion.loss_chunk_size", "must be > 0")


def _check_optim(cfg: Config) -> None:
    o = cfg.optim
    _need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _need(0 <= o.beta1 < 1, "optim.beta1", "must be in [0, 1)")
    _need(0 <= o.beta2 < 1, "optim.beta2", "must be in [0, 1)")
    _need(o.eps > 0, "optim.eps", "must be > 0")
    _need(o.grad_clip > 0, "optim.grad_clip", "must be > 0")


def _check_evaluation(cfg: Config) -> None:
    """Validation batches during training and the end-of-run evaluation."""
    _need(cfg.logging.val_batches >= 1, "logging.val_batches", "must be >= 1")
    e = cfg.eval
    _need(e.max_new_tokens > 0, "eval.max_new_tokens", "must be > 0")
    _need(e.limit is None or e.limit >= 1, "eval.limit", "must be >= 1 (or null)")
    _need(e.batch_size >= 1, "eval.batch_size", "must be >= 1")
    _need(e.block_size is None or e.block_size > 0, "eval.block_size", "must be > 0 (or null)")
    _need(0 < e.threshold <= 1, "eval.threshold", "must be in (0, 1]")


def _check_diffusion(cfg: Config) -> None:
    from ..core.masks import PATTERNS

    d = cfg.diffusion
    _need(d.pattern in PATTERNS, "diffusion.pattern", f"{d.pattern!r} is not one of {sorted(PATTERNS)}")
    _need(PATTERNS[d.pattern].streams == 2, "diffusion.pattern",
          "training needs a two-stream pattern (two_stream or bd3): the loss uses both halves")
    _need(d.block_size > 0, "diffusion.block_size", "must be > 0")
    _need(d.inference_block_size > 0, "diffusion.inference_block_size", "must be > 0")
    _need(0 < d.eps < 1, "diffusion.eps", "must be in (0, 1)")
    _need(d.half_life_ratio > 0, "diffusion.half_life_ratio", "must be > 0")
    _need(d.alpha >= 0 and d.beta >= 0 and d.alpha + d.beta > 0, "diffusion.alpha/beta", "must be >= 0, not both 0")
    _check_soft_targets(cfg)


def _check_soft_targets(cfg: Config) -> None:
    """The soft-target terms (docs/method.md): non-negative, and only where they can act."""
    d = cfg.diffusion
    for name in ("drafter_kl", "certainty", "teacher_kl"):
        _need(getattr(d, name) >= 0, f"diffusion.{name}", "must be >= 0 (0 = off)")
    _need(d.certainty_temperature > 0, "diffusion.certainty_temperature", "must be > 0")
    if d.drafter_kl > 0 or d.certainty > 0 or d.teacher_kl > 0:
        _need(cfg.engine.name == "torch", "diffusion.drafter_kl/certainty/teacher_kl",
              "the soft-target terms are computed by the torch engine's loss; the Megatron engine's "
              "vocab-parallel loss has only the joint terms (set them to 0 with engine=megatron)")
    _need(not (d.teacher_kl > 0 and cfg.adapter.name == "lora"), "diffusion.teacher_kl",
          "with adapter=lora the clean stream IS the frozen base, so the teacher KL is 0 by construction; "
          "use diffusion.drafter_kl (the drafter learns the base's AR view) instead")


def _check_stages(cfg: Config) -> None:
    _need(len(cfg.stages) > 0, "stages", "at least one stage is required")
    for i, st in enumerate(cfg.stages):
        key = f"stages.{i}"
        _need(st.kind in STAGE_KINDS, f"{key}.kind", f"{st.kind!r} is not one of {list(STAGE_KINDS)}")
        for sub, msg in st.data.distill.problems(cfg.engine.name) if st.kind == "distill" else []:
            _need(False, f"{key}.data.distill.{sub}", msg)
        _need(st.steps > 0, f"{key}.steps", "must be > 0")
        _need(st.micro_batch_size > 0, f"{key}.micro_batch_size", "must be > 0")
        _need(st.global_batch_size > 0, f"{key}.global_batch_size", "must be > 0")
        _need(st.data.num_proc >= 1, f"{key}.data.num_proc", "must be >= 1")
        _need(st.data.max_documents is None or st.data.max_documents >= 1, f"{key}.data.max_documents",
              "must be >= 1 (or null)")
        _need(st.global_batch_size % st.micro_batch_size == 0, f"{key}.global_batch_size",
              f"{st.global_batch_size} is not a multiple of micro_batch_size={st.micro_batch_size}")
        _need(st.data.kind == st.kind, f"{key}.data.kind",
              f"{st.data.kind!r} does not match the stage kind {st.kind!r}")
        _need(st.data.seq_len > 1, f"{key}.data.seq_len", "must be > 1")
        _need(len(st.data.sources) > 0, f"{key}.data.sources", "no data source given")
        _need(0 <= st.data.val_fraction < 1, f"{key}.data.val_fraction", "must be in [0, 1)")
        _need(st.data.max_bad_fraction is None or 0 <= st.data.max_bad_fraction <= 1,
              f"{key}.data.max_bad_fraction", "must be in [0, 1] (or null)")
        _need(st.lr is None or st.lr > 0, f"{key}.lr", "must be > 0")


def _check_lr_schedule(cfg: Config) -> None:
    """Peak and minimum learning rates (per stage) and the warmup / decay fractions."""
    _need(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    for i, st in enumerate(cfg.stages):
        peak = st.lr or cfg.optim.lr
        _need(0 <= cfg.optim.min_lr <= peak, "optim.min_lr",
              f"{cfg.optim.min_lr} must be in [0, the peak lr of stage {i}] (stages.{i}.lr or optim.lr = {peak})")
    _need(0 <= cfg.schedule.warmup_fraction < 1, "schedule.warmup_fraction", "must be in [0, 1)")
    _need(0 <= cfg.schedule.decay_fraction <= 1, "schedule.decay_fraction", "must be in [0, 1]")


def _check_checkpoint_and_logging(cfg: Config) -> None:
    _need(cfg.checkpoint.every > 0, "checkpoint.every", "must be > 0")
    _need(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    _need(cfg.logging.every > 0, "logging.every", "must be > 0")


def _check_engine(cfg: Config) -> None:
    """Parallelism sizes, and the keys one engine reads that the other would silently ignore."""
    for key in ("engine.tp", "engine.pp", "engine.cp", "engine.ep"):
        _need(_get(cfg, key) >= 1, key, "must be >= 1")
    if cfg.engine.name == "torch":
        _check_torch_engine(cfg)
    else:
        _check_megatron_engine(cfg)


def _check_torch_engine(cfg: Config) -> None:
    for key in ("engine.tp", "engine.pp", "engine.cp", "engine.ep"):
        _need(_get(cfg, key) == 1, key, "model parallelism needs engine=megatron (the torch engine is data-parallel)")
    _need(cfg.engine.distributed is not None, "engine.distributed", "the torch engine needs ddp or fsdp2")
    _need(not cfg.engine.sequence_parallel, "engine.sequence_parallel", "needs engine=megatron (tensor parallel)")
    _need(cfg.engine.recompute is None, "engine.recompute",
          "is a Megatron setting; the torch engine's activation checkpointing is model.gradient_checkpointing")
    _need(cfg.engine.init_from == "hf", "engine.init_from",
          "random initialisation is a Megatron-engine option; the torch engine starts from model.path's weights")
    _need(not (cfg.engine.precision == "fp32" and cfg.model.dtype == "bfloat16"), "engine.precision",
          "fp32 contradicts model.dtype=bfloat16 (model.dtype is the compute dtype; master weights are fp32)")


def _check_megatron_engine(cfg: Config) -> None:
    """Keys only the torch engine reads must not be silently ignored."""
    _need(cfg.engine.distributed is None, "engine.distributed",
          f"{cfg.engine.distributed!r} is a torch-engine setting, but engine.name=megatron (the recipe's "
          "engine?); add engine=torch to use the torch engine, or use engine.tp/pp/cp with Megatron")
    for key, unread in (("export.push_to_hub", cfg.export.push_to_hub), ("eval.at_end", cfg.eval.at_end)):
        _need(not unread, key, "the Megatron engine does not do this at the end of training: run "
              "`nemodiff-export checkpoint=<run.dir> out=<dir> push_to_hub=<repo>` and "
              "`nemodiff-eval model=<dir>` after it")
    _need(cfg.eval.probe.samples == 0, "eval.probe.samples",
          "decoding during training is a torch-engine feature; set eval.probe.samples=0 with engine=megatron")


def _check_adapter(cfg: Config) -> None:
    a = cfg.adapter
    if a.name == "lora":
        _need(a.rank >= 1, "adapter.rank", "must be >= 1")
        _need(a.alpha > 0, "adapter.alpha", "must be > 0")
        _need(0 <= a.dropout < 1, "adapter.dropout", "must be in [0, 1)")
        _need(len(a.target_modules) > 0 and all(isinstance(t, str) and t for t in a.target_modules),
              "adapter.target_modules", "needs at least one module name (e.g. [q_proj, k_proj, v_proj, o_proj])")
        _need(cfg.engine.name == "torch", "adapter.name",
              "lora needs engine=torch (the Megatron engine trains full conversions only; docs/adapters.md says why)")
    _need(not cfg.export.merge or a.name == "lora", "export.merge",
          "merges a drafter adapter into a full copy; it needs adapter=lora")


def _check_runtime(cfg: Config) -> None:
    _need(not cfg.engine.compile, "engine.compile", "torch.compile is not supported (neither engine reads it); "
          "remove the key")
    for key in ("engine.dist_timeout_s", "engine.main_work_timeout_s"):
        _need(_get(cfg, key) > 0, key, "must be > 0 seconds")


def _float_leaves(obj: Any, prefix: str):
    """``(dotted key, value)`` of every float in a dataclass tree (lists indexed like Hydra keys)."""
    if is_dataclass(obj):
        for f in fields(obj):
            yield from _float_leaves(getattr(obj, f.name), f"{prefix}{f.name}.")
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            yield from _float_leaves(item, f"{prefix}{i}.")
    elif isinstance(obj, float):
        yield prefix[:-1], obj


def register_schema() -> None:
    """Store the dataclass schema as Hydra's base config ``schema`` (conf/config.yaml extends it), so
    every key exists with its type and a misspelt override fails at composition naming the key."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=Config)


def compose(overrides: list[str] | None = None) -> Config:
    """Compose ``conf/config.yaml`` with overrides (e.g. ``["recipe=demo_cpu", "optim.lr=1e-4"]``;
    ``"hydra.searchpath=[file:///my/configs]"`` adds a directory of your own groups and recipes)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException

    register_schema()
    if not (CONF_DIR / "config.yaml").is_file():
        raise ConfigError(f"{CONF_DIR / 'config.yaml'} does not exist: this nemodiff_train install carries no "
                          "configs (install a wheel or `pip install .`, or run from a clone)")
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(str(e)) from None
    return to_config(cfg)


def save_config(cfg: Config, path: Path) -> None:
    from .secrets import scrub_env_values

    tree = scrub_env_values(OmegaConf.to_container(OmegaConf.structured(cfg)))  # no secret env value
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(tree)))


def load_saved_config(path: Path) -> Config:
    """Read a run directory's resolved ``config.yaml`` back (validated)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no saved config")
    return to_config(OmegaConf.load(path))


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def as_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists (for JSON)."""
    if is_dataclass(obj):
        return {f.name: as_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, list):
        return [as_dict(x) for x in obj]
    return obj
