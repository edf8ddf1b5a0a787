"""Our typed :class:`~nemodiff_train.config.schema.Config` → Megatron-Bridge ``ConfigContainer``.

One entry point, :func:`to_container` (one helper per section), so every translation lives in one tested place:

==========================  ===========================================================================
ours                        Megatron-Bridge
==========================  ===========================================================================
model.*, engine.tp/pp/...   model provider from ``AutoBridge`` (:func:`.model.build_provider`)
stage.steps / batch sizes   ``train.train_iters``, ``global_batch_size``, ``micro_batch_size``
optim.*                     ``optimizer`` (Adam with decoupled weight decay = AdamW, bf16, clip)
schedule.*                  ``scheduler`` (WSD with linear decay, cosine, constant; warmup iters)
engine.use_distributed_opt  ``optimizer.use_distributed_optimizer`` + ``ddp.use_distributed_optimizer``
engine.precision            ``mixed_precision="bf16_mixed"`` (fp32 on CPU)
checkpoint.*                ``checkpoint.save = load = <run.dir>/checkpoints/<i>_<stage>``, ``save_interval``,
                            ``most_recent_k``; ``pretrained_checkpoint`` = the HF init directory (stage 0)
                            or the previous stage's save directory (stage i > 0)
engine.init_from            ``hf``: stage 0 loads the HF weights (above); ``random``: no
                            ``pretrained_checkpoint``, Megatron initialises the weights
logging.*                   ``logger`` (interval, TensorBoard under run.dir, W&B project/entity/name),
                            ``validation`` (eval interval / iterations)
SIGTERM / SIGUSR1           ``train.exit_signal_handler`` (save, then exit 0; SIGUSR1 is forwarded as SIGTERM)
==========================  ===========================================================================

Resume semantics (docs/method.md, "Megatron resume"):
``finetune`` stays False. Megatron-Bridge resumes from ``load`` whenever it holds a checkpoint
(optimizer, scheduler, step and RNG restored); only when ``load`` is empty does it fall back to
``pretrained_checkpoint`` and load the weights alone, at step 0. So the first job of a chain
starts from the AR weights and every later job (same command) resumes.

A multi-stage recipe runs one stage per job: ``engine.stage_index`` selects it (it may be left
out only for a single-stage recipe).
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from pathlib import Path

from ... import runs
from ...config.errors import ConfigError
from ...config.schema import Config
from .model import build_provider

__all__ = ["to_container", "select_stage", "stage_checkpoint_dir", "ATTENTION_BACKENDS", "INIT_FROM"]

ATTENTION_BACKENDS = ("auto", "flex", "sdpa")
INIT_FROM = ("hf", "random")  # engine.init_from: the HF weights, or Megatron's random initialisation


def select_stage(cfg: Config) -> int:
    """The stage this job trains; a multi-stage recipe needs ``engine.stage_index``."""
    n = len(cfg.stages)
    i = cfg.engine.stage_index
    if i is None:
        if n == 1:
            return 0
        names = ", ".join(f"{k}={s.name}" for k, s in enumerate(cfg.stages))
        raise ConfigError(f"engine.stage_index: recipe {cfg.recipe!r} has {n} stages ({names}); the megatron engine "
                          "trains one stage per job, so set engine.stage_index=<i> (run them in order)")
    if not 0 <= i < n:
        raise ConfigError(f"engine.stage_index: {i} is outside 0..{n - 1}")
    return i


def stage_checkpoint_dir(run_dir: Path, cfg: Config, stage_index: int) -> Path:
    return runs.megatron_stage_dir(run_dir, stage_index, cfg.stages[stage_index].name)


def _check(cfg: Config) -> None:
    e = cfg.engine
    if e.name != "megatron":
        raise ConfigError(f"engine.name: to_container needs engine=megatron, got {e.name!r}")
    if e.megatron_attention not in ATTENTION_BACKENDS:
        raise ConfigError(f"engine.megatron_attention: {e.megatron_attention!r} is not one of "
                          f"{list(ATTENTION_BACKENDS)}")
    if e.cp > 1:  # every backend of the two-stream attention (auto, flex, sdpa) gathers K/V over the CP group
        for k, st in enumerate(cfg.stages):
            if st.data.seq_len % e.cp:
                raise ConfigError(f"engine.cp: stage {k} ({st.name}) has seq_len={st.data.seq_len}, not a multiple "
                                  f"of engine.cp={e.cp} (Megatron splits the 2L row into 2·cp equal chunks)")
    if e.ep != 1:
        raise ConfigError("engine.ep: expert parallelism needs a MoE model; the supported families are dense")
    if e.recompute not in (None, "selective", "full"):
        raise ConfigError(f"engine.recompute: {e.recompute!r} is not one of [null, selective, full]")
    if e.init_from not in INIT_FROM:
        raise ConfigError(f"engine.init_from: {e.init_from!r} is not one of {list(INIT_FROM)}")
    if cfg.diffusion.pattern not in ("two_stream", "bd3"):
        raise ConfigError(f"diffusion.pattern: {cfg.diffusion.pattern!r} is not a two-stream pattern")


def _scheduler(cfg: Config, steps: int, SchedulerConfig):
    s, o = cfg.schedule, cfg.optim
    warmup = int(round(s.warmup_fraction * steps))
    common = dict(lr_warmup_iters=warmup, lr_warmup_init=0.0, lr_decay_iters=steps,
                  start_weight_decay=o.weight_decay, end_weight_decay=o.weight_decay,
                  weight_decay_incr_style="constant")
    if s.name == "wsd":
        decay = int(round(s.decay_fraction * steps))
        return SchedulerConfig(lr_decay_style="WSD", lr_wsd_decay_style="linear",
                               lr_wsd_decay_iters=max(decay, 1), **common)
    if s.name == "cosine":
        return SchedulerConfig(lr_decay_style="cosine", **common)
    return SchedulerConfig(lr_decay_style="constant", **common)


def to_container(cfg: Config, *, run_dir: str | Path | None = None, hf_dir: str | Path | None = None,
                 hf_config=None, train_blend: list[str] | None = None, valid_blend: list[str] | None = None,
                 stage_index: int | None = None, cpu: bool = False):
    """Translate ``cfg`` (with ``engine=megatron``) into a Megatron-Bridge ``ConfigContainer``.

    One helper per section of the container (the table in the module docstring), each reading only
    the keys of its concern.

    Args:
        run_dir: defaults to ``cfg.run.dir`` (required: every rank and every job of a chain share it).
        hf_dir: the HF directory stage 0 starts from (:func:`.model.prepare_init_checkpoint`); its
            config also builds the model provider unless ``hf_config`` is given.
        hf_config: an HF config object to build the provider from without any weights (tests, dry runs).
        train_blend, valid_blend: converted data (:func:`.data.convert_prepared` prefixes, optionally
            ``weight prefix ...``); default: ``<run.dir>/megatron/data/<stage>/{train,val}``.
        stage_index: overrides :func:`select_stage`.
        cpu: gloo + fp32 + plain optimizer (tests on CPU only).
    """
    from megatron.bridge.training.config import ConfigContainer, RNGConfig, SchedulerConfig
    from megatron.bridge.training.tokenizers.config import TokenizerConfig

    from .model import auto_bridge

    _check(cfg)
    i = select_stage(cfg) if stage_index is None else stage_index
    stage = cfg.stages[i]
    run_dir = Path(run_dir or cfg.run.dir or "")
    if not str(run_dir) or str(run_dir) == ".":
        raise ConfigError("run.dir: the megatron engine needs an explicit run.dir shared by all ranks and jobs")
    if hf_dir is None and hf_config is None:
        raise ValueError("to_container needs hf_dir (the prepared HF init directory) or hf_config")
    provider = build_provider(cfg, auto_bridge(hf_dir=hf_dir, hf_config=hf_config), i, cpu=cpu)
    bf16 = bool(provider.bf16)
    dist_opt = cfg.engine.use_distributed_optimizer and not cpu
    data = _StageData.of(cfg, run_dir, i, train_blend, valid_blend)
    return ConfigContainer(
        model=provider,
        train=_training(stage),
        validation=_validation(cfg, data.has_val),
        optimizer=_optimizer(cfg, i, bf16=bf16, dist_opt=dist_opt, cpu=cpu),
        scheduler=_scheduler(cfg, stage.steps, SchedulerConfig),
        ddp=_ddp(dist_opt),
        dataset=_dataset(cfg, i, data, cpu),
        logger=_logger(cfg, run_dir),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=int(provider.vocab_size) - 1),
        checkpoint=_checkpoint(cfg, run_dir, i, hf_dir, cpu),
        dist=_dist(cfg, cpu),
        rng=RNGConfig(seed=1234 + cfg.run.seed),
        mixed_precision="bf16_mixed" if bf16 else None,
    )


@dataclass
class _StageData:
    """The stage's converted data: blends, and whether validation runs on it."""

    train_blend: list[str]
    valid_blend: list[str]
    has_val: bool

    @classmethod
    def of(cls, cfg: Config, run_dir: Path, i: int, train_blend, valid_blend) -> "_StageData":
        lg = cfg.logging
        data_dir = runs.megatron_data_dir(run_dir, i, cfg.stages[i].name)
        train_blend = train_blend or [str(data_dir / "train")]
        valid_blend = valid_blend if valid_blend is not None else [str(data_dir / "val")]
        return cls(list(train_blend), list(valid_blend), bool(valid_blend) and lg.val_every > 0 and lg.val_batches > 0)


def _training(stage):
    from megatron.bridge.training.config import TrainingConfig

    return TrainingConfig(train_iters=stage.steps, global_batch_size=stage.global_batch_size,
                          micro_batch_size=stage.micro_batch_size, exit_signal_handler=True,
                          exit_signal=signal.SIGTERM, manual_gc=True, manual_gc_interval=100)


def _validation(cfg: Config, has_val: bool):
    from megatron.bridge.training.config import ValidationConfig

    lg = cfg.logging
    return ValidationConfig(eval_iters=lg.val_batches if has_val else 0,
                            eval_interval=lg.val_every if has_val else None)


def _optimizer(cfg: Config, i: int, *, bf16: bool, dist_opt: bool, cpu: bool):
    """Adam with decoupled weight decay (= AdamW); the stage's LR, else ``optim.lr``."""
    import torch
    from megatron.bridge.training.config import OptimizerConfig

    o, stage = cfg.optim, cfg.stages[i]
    lr = stage.lr if stage.lr is not None else o.lr
    return OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=min(o.min_lr, lr), weight_decay=o.weight_decay,
        adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=o.eps,
        clip_grad=0.0 if cpu else o.grad_clip,  # CPU: Megatron's clip asserts CUDA tensors
        use_distributed_optimizer=dist_opt, bf16=bf16, fp16=False,
        params_dtype=torch.bfloat16 if bf16 else torch.float32)


def _ddp(dist_opt: bool):
    from megatron.bridge.training.config import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        use_distributed_optimizer=dist_opt, grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        overlap_param_gather=False, check_for_nan_in_grad=True,
        average_in_collective=False)  # per-token normalisation: sums, divided once by the global count


def _dataset(cfg: Config, i: int, data: _StageData, cpu: bool):
    from .data import TwoStreamDatasetProvider

    return TwoStreamDatasetProvider(
        seq_length=cfg.stages[i].data.seq_len,
        train_blend=data.train_blend,
        valid_blend=data.valid_blend if data.has_val else [],
        seed=cfg.run.seed,
        stage_index=i,
        sample_offset=sum(s.steps * s.global_batch_size for s in cfg.stages[:i]),
        dataloader_type="single",  # sequential sampler driven by consumed samples: exact resume
        num_workers=0 if cpu else 2,
        data_sharding=True,
        pin_memory=not cpu,
        drop_last=True,
        persistent_workers=False)


def _logger(cfg: Config, run_dir: Path):
    """Log interval, TensorBoard under ``run.dir``, W&B when ``logging.wandb.project`` is set."""
    from megatron.bridge.training.config import LoggerConfig

    w = cfg.logging.wandb
    wandb_on = bool(w.project) and w.mode != "disabled"
    return LoggerConfig(
        log_interval=cfg.logging.every,
        log_throughput=True,
        tensorboard_dir=str(run_dir / "tensorboard"),
        wandb_project=w.project if wandb_on else None,
        wandb_entity=w.entity if wandb_on else None,
        wandb_exp_name=(w.name or cfg.run.name or cfg.recipe or "nemodiff") if wandb_on else None,
        wandb_save_dir=str(run_dir / "wandb") if wandb_on else None)


def _pretrained(cfg: Config, run_dir: Path, i: int, hf_dir) -> str | None:
    """What a stage loads when its save directory is empty: the previous stage's saves (stage i > 0),
    the HF init directory (stage 0, ``engine.init_from=hf``), or nothing (``random``: the provider
    initialises, ``perform_initialization``)."""
    if i > 0:
        return str(stage_checkpoint_dir(run_dir, cfg, i - 1))
    if cfg.engine.init_from == "hf" and hf_dir is not None:
        return str(hf_dir)
    return None


def _checkpoint(cfg: Config, run_dir: Path, i: int, hf_dir, cpu: bool):
    from megatron.bridge.training.config import CheckpointConfig

    save = stage_checkpoint_dir(run_dir, cfg, i)
    return CheckpointConfig(
        save=str(save),
        load=str(save) if cfg.checkpoint.resume else None,
        pretrained_checkpoint=_pretrained(cfg, run_dir, i, hf_dir),
        save_interval=cfg.checkpoint.every,
        most_recent_k=cfg.checkpoint.keep_last,
        ckpt_format=cfg.engine.megatron_checkpoint_format,
        finetune=False,
        save_optim=True,
        save_rng=True,
        load_optim=True,
        load_rng=True,
        async_save=False,
        fully_parallel_save=not cpu)


def _dist(cfg: Config, cpu: bool):
    from megatron.bridge.training.config import DistributedInitConfig

    return DistributedInitConfig(distributed_backend="gloo" if cpu else "nccl",
                                 distributed_timeout_minutes=max(1, math.ceil(cfg.engine.dist_timeout_s / 60)))
