"""Our typed :class:`~nemodiff_train.config.schema.Config` → Megatron-Bridge ``ConfigContainer``.

One function, :func:`to_container`, so every translation lives in one tested place:

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
from pathlib import Path

from ... import runs
from ...config.load import ConfigError
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
    if e.cp != 1:
        raise ConfigError("engine.cp: context parallelism is not supported by the two-stream attention yet "
                          "(the 2L x 2L mask needs the whole row on one rank); use tp/pp/dp")
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
    import torch
    from megatron.bridge.training.config import (
        CheckpointConfig,
        ConfigContainer,
        DistributedDataParallelConfig,
        DistributedInitConfig,
        LoggerConfig,
        OptimizerConfig,
        RNGConfig,
        SchedulerConfig,
        TrainingConfig,
        ValidationConfig,
    )
    from megatron.bridge.training.tokenizers.config import TokenizerConfig

    from .data import TwoStreamDatasetProvider
    from .model import auto_bridge

    _check(cfg)
    e = cfg.engine
    i = select_stage(cfg) if stage_index is None else stage_index
    stage = cfg.stages[i]
    run_dir = Path(run_dir or cfg.run.dir or "")
    if not str(run_dir) or str(run_dir) == ".":
        raise ConfigError("run.dir: the megatron engine needs an explicit run.dir shared by all ranks and jobs")
    if hf_dir is None and hf_config is None:
        raise ValueError("to_container needs hf_dir (the prepared HF init directory) or hf_config")
    bridge = auto_bridge(hf_dir=hf_dir, hf_config=hf_config)
    provider = build_provider(cfg, bridge, i, cpu=cpu)
    bf16 = bool(provider.bf16)
    dist_opt = cfg.engine.use_distributed_optimizer and not cpu
    o, lg = cfg.optim, cfg.logging
    lr = stage.lr if stage.lr is not None else o.lr

    data_dir = runs.megatron_data_dir(run_dir, i, stage.name)
    train_blend = train_blend or [str(data_dir / "train")]
    valid_blend = valid_blend if valid_blend is not None else [str(data_dir / "val")]
    has_val = bool(valid_blend) and lg.val_every > 0 and lg.val_batches > 0

    save = stage_checkpoint_dir(run_dir, cfg, i)
    if i > 0:
        pretrained = str(stage_checkpoint_dir(run_dir, cfg, i - 1))
    elif e.init_from == "hf" and hf_dir is not None:
        pretrained = str(hf_dir)
    else:  # engine.init_from=random: nothing to load, the provider initialises (perform_initialization)
        pretrained = None
    w = lg.wandb
    wandb_on = bool(w.project) and w.mode != "disabled"

    container = ConfigContainer(
        model=provider,
        train=TrainingConfig(
            train_iters=stage.steps,
            global_batch_size=stage.global_batch_size,
            micro_batch_size=stage.micro_batch_size,
            exit_signal_handler=True,
            exit_signal=signal.SIGTERM,
            manual_gc=True,
            manual_gc_interval=100,
        ),
        validation=ValidationConfig(eval_iters=lg.val_batches if has_val else 0,
                                    eval_interval=lg.val_every if has_val else None),
        optimizer=OptimizerConfig(
            optimizer="adam",
            lr=lr,
            min_lr=min(o.min_lr, lr),
            weight_decay=o.weight_decay,
            adam_beta1=o.beta1,
            adam_beta2=o.beta2,
            adam_eps=o.eps,
            clip_grad=0.0 if cpu else o.grad_clip,  # CPU: Megatron's clip asserts CUDA tensors
            use_distributed_optimizer=dist_opt,
            bf16=bf16,
            fp16=False,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
        ),
        scheduler=_scheduler(cfg, stage.steps, SchedulerConfig),
        ddp=DistributedDataParallelConfig(
            use_distributed_optimizer=dist_opt,
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            overlap_param_gather=False,
            check_for_nan_in_grad=True,
            average_in_collective=False,  # per-token normalisation: sums, divided once by the global count
        ),
        dataset=TwoStreamDatasetProvider(
            seq_length=stage.data.seq_len,
            train_blend=list(train_blend),
            valid_blend=list(valid_blend) if has_val else [],
            seed=cfg.run.seed,
            stage_index=i,
            sample_offset=sum(s.steps * s.global_batch_size for s in cfg.stages[:i]),
            dataloader_type="single",  # sequential sampler driven by consumed samples: exact resume
            num_workers=0 if cpu else 2,
            data_sharding=True,
            pin_memory=not cpu,
            drop_last=True,
            persistent_workers=False,
        ),
        logger=LoggerConfig(
            log_interval=lg.every,
            log_throughput=True,
            tensorboard_dir=str(run_dir / "tensorboard"),
            wandb_project=w.project if wandb_on else None,
            wandb_entity=w.entity if wandb_on else None,
            wandb_exp_name=(w.name or cfg.run.name or cfg.recipe or "nemodiff") if wandb_on else None,
            wandb_save_dir=str(run_dir / "wandb") if wandb_on else None,
        ),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=int(provider.vocab_size) - 1),
        checkpoint=CheckpointConfig(
            save=str(save),
            load=str(save) if cfg.checkpoint.resume else None,
            pretrained_checkpoint=pretrained,
            save_interval=cfg.checkpoint.every,
            most_recent_k=cfg.checkpoint.keep_last,
            ckpt_format=e.megatron_checkpoint_format,
            finetune=False,
            save_optim=True,
            save_rng=True,
            load_optim=True,
            load_rng=True,
            async_save=False,
            fully_parallel_save=not cpu,
        ),
        dist=DistributedInitConfig(distributed_backend="gloo" if cpu else "nccl", distributed_timeout_minutes=max(1, math.ceil(cfg.engine.dist_timeout_s / 60))),
        rng=RNGConfig(seed=1234 + cfg.run.seed),
        mixed_precision="bf16_mixed" if bf16 else None,
    )
    return container
