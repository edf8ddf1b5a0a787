"""Section validators of a composed :class:`~nemodiff_train.config.schema.Config`: each rejects an
impossible value with a :class:`~nemodiff_train.config.errors.ConfigError` naming the key."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any

from .errors import ConfigError
from .schema import STAGE_KINDS, Config

__all__ = ["validate", "limit_problem"]


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
    problem = limit_problem(e.limit, [e.task] if isinstance(e.task, str) else list(e.task))
    _need(problem is None, "eval.limit", problem)
    _need(e.batch_size >= 1, "eval.batch_size", "must be >= 1")
    _need(e.block_size is None or e.block_size > 0, "eval.block_size", "must be > 0 (or null)")
    _need(0 < e.threshold <= 1, "eval.threshold", "must be in (0, 1]")
    from ..decoding.config import COMMIT_RULES

    rules = [("eval.commit_rule", e.commit_rule), ("eval.probe.commit_rule", e.probe.commit_rule)]
    for key, rule in rules + [("eval.sweep.commit_rule", r) for r in e.sweep.commit_rule]:
        _need(rule in COMMIT_RULES, key, f"must be one of {list(COMMIT_RULES)}, got {rule!r}")


def limit_problem(limit: Any, tasks: list[str]) -> str | None:
    """What is wrong with a row ``limit`` (None, an int >= 1, or ``{evaluated task: int >= 1}``), or None."""
    if isinstance(limit, Mapping):
        stray = [t for t in limit if t not in tasks]
        if stray:
            return f"names {stray}, which are not among the evaluated tasks {tasks}"
        values = list(limit.values())
    else:
        values = [] if limit is None else [limit]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        return f"must be None, an int >= 1 or a mapping {{task: int >= 1}}, got {limit!r}"
    return None


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
    _need(0.0 <= d.full_block_fraction <= 1.0, "diffusion.full_block_fraction", "must be in [0, 1]")
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
    for key in ("engine.tp", "engine.pp", "engine.ep"):
        _need(_get(cfg, key) == 1, key, "model parallelism needs engine=megatron (the torch engine is data-parallel, "
              "with context parallelism through engine.cp)")
    if cfg.engine.cp > 1:
        _check_torch_context_parallel(cfg)
    _need(cfg.engine.distributed is not None, "engine.distributed", "the torch engine needs ddp or fsdp2")
    _need(not cfg.engine.sequence_parallel, "engine.sequence_parallel", "needs engine=megatron (tensor parallel)")
    _need(cfg.engine.recompute is None, "engine.recompute",
          "is a Megatron setting; the torch engine's activation checkpointing is model.gradient_checkpointing")
    _need(cfg.engine.init_from == "hf", "engine.init_from",
          "random initialisation is a Megatron-engine option; the torch engine starts from model.path's weights")
    _need(not (cfg.engine.precision == "fp32" and cfg.model.dtype == "bfloat16"), "engine.precision",
          "fp32 contradicts model.dtype=bfloat16 (model.dtype is the compute dtype; master weights are fp32)")


def _check_torch_context_parallel(cfg: Config) -> None:
    """``engine.cp > 1`` with the torch engine: what docs/context_parallel.md verifies, and nothing else."""
    cp, d = cfg.engine.cp, cfg.diffusion
    why = f"is not verified under context parallelism (engine.cp={cp}); train it with engine.cp=1"
    _need(cfg.model.attn_implementation in (None, "sdpa", "eager"), "model.attn_implementation",
          f"{cfg.model.attn_implementation!r}: context parallelism gathers keys and values for sdpa or eager attention "
          "with a dense mask (flex_attention is not verified under it); use sdpa or eager, or leave it unset")
    for key in ("drafter_kl", "certainty", "teacher_kl"):
        _need(getattr(d, key) == 0, f"diffusion.{key}", f"the soft-target term {why}")
    for i, st in enumerate(cfg.stages):
        _need(st.data.seq_len % (2 * cp) == 0, f"stages.{i}.data.seq_len",
              f"{st.data.seq_len} is not divisible by 2·engine.cp = {2 * cp}: each stream of the two-stream row is "
              "cut into 2·cp equal chunks (the zigzag split, docs/context_parallel.md)")
        _need(st.kind != "distill" or st.data.distill.teacher != "current", f"stages.{i}.data.distill.teacher",
              f"'current' {why}")


def _check_megatron_engine(cfg: Config) -> None:
    """Keys only the torch engine reads must not be silently ignored."""
    _need(cfg.engine.distributed is None, "engine.distributed",
          f"{cfg.engine.distributed!r} is a torch-engine setting, but engine.name=megatron (the recipe's "
          "engine?); add engine=torch to use the torch engine, or use engine.tp/pp/cp with Megatron")
    for key, unread in (("export.push_to_hub", cfg.export.push_to_hub), ("eval.at_end", cfg.eval.at_end)):
        _need(not unread, key, "the Megatron engine does not do this at the end of training: run "
              "`nemodiff-export checkpoint=<run.dir> out=<dir> push_to_hub=<repo>` and "
              "`nemodiff-eval model=<dir>` after it")
    _need(not cfg.engine.skip_unmasked_blocks, "engine.skip_unmasked_blocks",
          "a torch-engine setting (a compacted two-stream forward); the Megatron engine computes whole rows")
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
