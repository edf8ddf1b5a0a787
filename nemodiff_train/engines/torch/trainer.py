"""The torch engine: one process or ``torchrun`` (DDP or FSDP2), CPU (gloo) or CUDA (nccl).

A run is a list of stages (e.g. joint AR + diffusion continued pretraining, then SFT) over one model;
the global step counts on across stages and each stage gets a fresh AdamW and its own LR schedule.
Each optimizer step:

1. every rank noises its micro-batches (noise seeded per sample, see ``batches.py``);
2. the global loss denominator ``N_mask + β·N_AR`` of the whole step is all-reduced *before* the
   forward, so each micro-batch backpropagates ``numerator · world / global_denominator`` and the
   data-parallel gradient average equals the gradient of the global per-token mean (docs/method.md:
   the loss is a global token mean, not a mean of per-batch means);
3. clip, step, log. Checkpoints every ``checkpoint.every`` steps, at stage ends, and on SIGTERM /
   SIGUSR1 (then exit 0, so a preempted Slurm job's successor resumes).

With ``adapter=lora`` (docs/adapters.md) the base is frozen and only the drafter adapter trains
(:func:`trained_module`: it is what the optimizer holds and what checkpoints save; the base is
reloaded from ``model.path`` on resume). The noisy half runs with the adapter on and the clean half
with it off, so the diffusion term trains the adapter; the AR term is still computed and logged (it
is the frozen base's AR loss and stays constant) and stays in the loss denominator, but no trainable
parameter reaches it: the clean half never sees the noisy half or the mask row, and the head is the
base's, frozen.

The engine only trains: export and evaluation at the end are :mod:`nemodiff_train.orchestrate`'s.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ...config.load import as_dict, save_config
from ...config.schema import Config, StageConfig
from ...core.distill_losses import DistillWeights
from ...core.losses import MASK_RATE_EDGES, LossParts, LossWeights
from ...models.hf import DLMModel
from ...models.step import VALIDATION_SEED_OFFSET, joint_step
from ... import runs
from .. import TrainOutcome
from .batches import GlobalOrder, MicroBatch, collate, rank_positions
from ...faults import fault_point
from .checkpointing import (load_checkpoint, model_identity, read_trainer_state, restore_rng, resume_checkpoint,
                            save_checkpoint)
from .distributed import DistEnv, all_reduce_sum, init_distributed
from .lr_schedule import lr_at
from .main_work import MainWork
from .metrics import MetricsSink
from .parallelize import Parallelized, parallelize
from .setup import build_model, build_teacher, prepare_stage_data

log = logging.getLogger(__name__)

__all__ = ["train", "TwoStreamLoss", "trained_module"]


class TwoStreamLoss(nn.Module):
    """``forward(micro_batch) -> LossParts``: the unit DDP/FSDP wrap (their hooks need a forward)."""

    def __init__(self, dlm: DLMModel, block_size: int, chunk_size: int, distill: DistillWeights | None = None,
                 teacher: DLMModel | None = None):
        super().__init__()
        self.dlm = dlm
        self.block_size = block_size
        self.chunk_size = chunk_size
        self.distill = distill
        self._teacher = (teacher,)  # a tuple: the frozen teacher is no submodule (DDP/FSDP must not wrap it)

    def forward(self, mb: MicroBatch, diagnostics: bool = False):
        """:func:`~nemodiff_train.models.step.joint_step`; with ``diagnostics`` also its masked-token
        stats (a flag, not a second method, so that FSDP's forward hooks gather the parameters)."""
        return joint_step(self.dlm, mb, self.block_size, self.chunk_size, diagnostics=diagnostics,
                          distill=self.distill, teacher=self._teacher[0])


class _StopFlag:
    """Set by SIGTERM / SIGUSR1; checked (and agreed across ranks) at step boundaries."""

    def __init__(self):
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum

    def agreed(self, device) -> bool:
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=device)
        return bool(all_reduce_sum(flag).item() > 0)


@dataclass
class _Progress:
    step: int = 0  # global optimizer steps done
    tokens: int = 0  # clean tokens consumed (L per sample)


def _stage_bounds(cfg: Config) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for st in cfg.stages:
        bounds.append((start, start + st.steps))
        start += st.steps
    return bounds


def trained_module(dlm: DLMModel) -> nn.Module:
    """What trains and is checkpointed: the drafter adapter (its LoRA pairs and mask row; the frozen
    base is reloaded from ``model.path``) when one is attached, else the whole HF model."""
    return dlm.adapter if dlm.adapter is not None else dlm.hf


def _state(dlm: DLMModel, optim: torch.optim.Optimizer | None, with_optim: bool) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(trained_module(dlm))}
    if with_optim and optim is not None:
        state["optim"] = get_optimizer_state_dict(trained_module(dlm), optim)
    return state


def _load_state(dlm: DLMModel, optim, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(trained_module(dlm), state["model"])
    if "optim" in state and optim is not None:
        set_optimizer_state_dict(trained_module(dlm), optim, state["optim"])


def _make_optimizer(dlm: DLMModel, cfg: Config, stage: StageConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in trained_module(dlm).named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)  # norms and biases are not decayed
    o = cfg.optim
    return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=stage.lr or o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             fused=torch.cuda.is_available() and next(dlm.parameters()).is_cuda)


def _reduce_parts(parts: LossParts, device) -> LossParts:
    flat, names = parts.flat()
    flat = flat.to(device)
    all_reduce_sum(flat)
    return LossParts.from_flat(flat, names)


def loss_weights(cfg: Config) -> LossWeights:
    """α, β and the soft-target terms' weights of ``cfg.diffusion``."""
    d = cfg.diffusion
    return LossWeights(d.alpha, d.beta, DistillWeights(d.drafter_kl, d.certainty, d.certainty_temperature,
                                                       d.teacher_kl))


def validation_split(n: int, world: int, rank: int, micro: int) -> list[list[int | None]]:
    """This rank's validation micro-batches over rows ``0..n-1``: row ``i`` goes to rank ``i % world``,
    and every rank gets the SAME number of micro-batches of ``micro`` rows, padded with ``None``
    (a padding row: computed, contributes zero). Under FSDP2 every forward all-gathers, so a rank
    with fewer forwards than the others would leave them waiting forever."""
    mine: list[int | None] = list(range(rank, n, world))
    forwards = max(1, math.ceil(math.ceil(n / world) / micro))
    mine += [None] * (forwards * micro - len(mine))
    return [mine[i:i + micro] for i in range(0, len(mine), micro)]


@torch.no_grad()
def _validate(par: Parallelized, val_ds, cfg: Config, stage: StageConfig, env: DistEnv, mask_id: int) -> dict:
    """Held-out AR loss (mean next-token CE) and diffusion loss (Σ CE/p per masked token), fixed noise.

    The same ``logging.val_batches × micro_batch_size`` rows whatever the world size, each noised
    from its own index, so the result equals the one-process loss (up to summation order).
    """
    if val_ds is None or len(val_ds) == 0:
        return {}
    mbs = stage.micro_batch_size
    n = min(len(val_ds), cfg.logging.val_batches * mbs)
    total = LossParts(*(torch.zeros((), device=env.device) for _ in range(4)))
    stats = torch.zeros(len(MASK_RATE_EDGES) - 1, 3, dtype=torch.float64, device=env.device)
    d = cfg.diffusion
    module = par.loss_module
    module.eval()
    for idx in validation_split(n, env.world_size, env.rank, mbs):
        rows = []
        for i in idx:
            row = dict(val_ds[0 if i is None else i])
            if i is None:  # padding: no supervised token, so no AR target and nothing masked
                row["loss_mask"] = torch.zeros_like(torch.as_tensor(row["loss_mask"]), dtype=torch.bool)
            rows.append(row)
        mb = collate(rows, [0 if i is None else i for i in idx], seed=cfg.run.seed + VALIDATION_SEED_OFFSET,
                     mask_token_id=mask_id, schedule=d.schedule, eps=d.eps, block_size=d.block_size, half_life_ratio=d.half_life_ratio)
        with par.compute_context(env.device):
            parts, mb_stats = module(mb.to(env.device), diagnostics=True)
        total = total + parts.detached()
        stats += mb_stats
    module.train()
    total = _reduce_parts(total, env.device)
    all_reduce_sum(stats)
    w = loss_weights(cfg)
    return {**{f"val_{k}": v for k, v in total.term_means().items()},
            "val_ar_loss": (total.ar_sum / total.ar_count.clamp_min(1)).item(),
            "val_diffusion_loss": (total.diffusion_sum / total.diffusion_count.clamp_min(1)).item(),
            "val_loss": (total.numerator(w) / total.denominator(w)).item(),
            **_mask_rate_metrics(stats)}


def _mask_rate_metrics(stats: torch.Tensor) -> dict[str, float]:
    """``val_masked_token_accuracy`` and the unweighted masked-token CE per masking-rate bucket
    (``val_diffusion_ce_p0.25-0.50`` ...) from :func:`masked_token_stats` sums."""
    ce, hits, count = stats.sum(0).tolist()
    out = {"val_masked_token_accuracy": hits / count if count else float("nan")}
    for (lo, hi), (b_ce, _, b_count) in zip(zip(MASK_RATE_EDGES, MASK_RATE_EDGES[1:]), stats.tolist()):
        if b_count:
            out[f"val_diffusion_ce_p{lo:.2f}-{hi:.2f}"] = b_ce / b_count
    return out


ValidationHook = Callable[[DLMModel], dict]


def _validation_row(par: Parallelized, val_ds, cfg: Config, stage: StageConfig, env: DistEnv, mask_id: int,
                    hooks: Sequence[ValidationHook], work: MainWork, step: int,
                    hook_memo: dict[int, dict] | None = None) -> dict:
    """Validation losses, plus what each hook measures on rank 0 (e.g. decoding TPF with the current
    weights); the other ranks wait on a file (``main_work.py``), not in a collective, so a slow hook
    neither desynchronises the steps nor trips the process-group time-out.

    ``hook_memo`` maps a step to its hooks' row: a stage's first validation runs at the step where the
    previous stage's last one ran, on the same weights, so the hooks (a decode probe: seconds to
    minutes) are not run twice. The losses are, on the new stage's validation data."""
    row = _validate(par, val_ds, cfg, stage, env, mask_id)
    if hooks and hook_memo is not None and step in hook_memo:
        row.update(hook_memo[step])
    elif hooks:
        dlm = par.loss_module.dlm

        def _hooks() -> dict:
            out: dict = {}
            for hook in hooks:
                out.update(hook(dlm))
            return out

        measured = work.run(f"validation_hooks_{step}", _hooks) or {}
        if hook_memo is not None:
            hook_memo[step] = measured
        row.update(measured)
    return row


def train(cfg: Config, run_dir: Path, validation_hooks: Sequence[ValidationHook] = ()) -> TrainOutcome:
    """Run (or resume) every stage of ``cfg`` in ``run_dir``.

    Returns a :class:`~nemodiff_train.engines.TrainOutcome`: ``finished`` unless a signal stopped the
    run; the caller (:mod:`nemodiff_train.orchestrate`) exports and evaluates, then closes the metrics.

    ``validation_hooks`` run on rank 0 after every validation, with the unwrapped model; their
    metrics join the validation row (``nemodiff-train`` passes the decode probe here).
    """
    stop = _StopFlag()  # first: under Slurm the launcher leaves TERM/USR1 ignored until we take them
    env = init_distributed(cfg.engine.device, timeout_s=cfg.engine.dist_timeout_s)
    torch.manual_seed(cfg.run.seed)
    run_dir = Path(run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / runs.CONFIG_FILE)
    work = MainWork(env, run_dir, cfg.engine.main_work_timeout_s)
    dlm = build_model(cfg, run_dir, env, work)
    mask_id = dlm.settings.mask_token_id
    weights = loss_weights(cfg)

    progress = _Progress()
    # the newest checkpoint that verifies against this model; all failing is an error, never step 0
    ckpt, notes = (resume_checkpoint(run_dir, model_identity(_state(dlm, None, False)["model"]))
                   if cfg.checkpoint.resume else (None, []))
    resume_state = read_trainer_state(ckpt) if ckpt else None
    if resume_state:
        progress = _Progress(resume_state["step"], resume_state["tokens"])
    sink = MetricsSink(run_dir, enabled=env.is_main, total_steps=cfg.total_steps, start_step=progress.step,
                       progress_bar=cfg.logging.progress_bar, wandb_cfg=cfg.logging.wandb,
                       config_dict=as_dict(cfg), run_name=cfg.run.name or cfg.recipe or run_dir.name)
    for note in notes:
        sink.message(note)
    if dlm.adapter is not None:
        base = sum(p.numel() for p in dlm.hf.parameters())
        sink.message(f"adapter=lora: base frozen ({base:,} parameters); training {dlm.adapter.trainable_parameters():,} "
                     f"(LoRA r={dlm.adapter.rank} on {len(dlm.adapter.paths)} linear layers + the mask row)")
    if ckpt:
        sink.message(f"resuming from {ckpt} (step {progress.step})")

    teacher = build_teacher(cfg, env, work)
    par = parallelize(TwoStreamLoss(dlm, cfg.diffusion.block_size, cfg.diffusion.loss_chunk_size, weights.distill,
                                    teacher), cfg, env)
    stopped = False
    hook_memo: dict[int, dict] = {}  # step -> the validation hooks' row (see _validation_row)
    for stage_index, (stage, (first, last)) in enumerate(zip(cfg.stages, _stage_bounds(cfg))):
        if progress.step >= last:
            continue
        sink.start_stage(stage.name, stage_index, len(cfg.stages), first, last, progress.step,
                         detail=f"{stage.kind}, {stage.global_batch_size} rows x {stage.data.seq_len} tokens per step")
        train_ds, val_ds = prepare_stage_data(cfg, stage_index, run_dir, work)
        optim = _make_optimizer(dlm, cfg, stage)
        if ckpt is not None:  # resume: weights always; optimizer only inside the same stage
            same_stage = first < progress.step
            state = _state(dlm, optim, with_optim=same_stage)
            load_checkpoint(ckpt, state)
            _load_state(dlm, optim, state)
            note = restore_rng(ckpt, env.rank, env.world_size)  # dropout etc.; noise and data order are seeded
            if note:
                sink.message(note)
            ckpt = None
        order = GlobalOrder(len(train_ds), cfg.run.seed, stage_index)
        sample_offset = sum(s.steps * s.global_batch_size for s in cfg.stages[:stage_index])
        if progress.step == first and cfg.logging.val_every > 0:
            sink.log({"step": progress.step, "stage": stage.name,
                      **_validation_row(par, val_ds, cfg, stage, env, mask_id, validation_hooks, work, progress.step,
                                        hook_memo)})
        stopped = _run_stage(cfg, stage, stage_index, first, last, env, dlm, par, optim, order,
                             sample_offset, train_ds, val_ds, weights, mask_id, progress, sink, stop, run_dir,
                             validation_hooks, work, hook_memo)
        sink.end_stage()
        if stopped:
            break
    # what follows training (export, evaluation) is the orchestration's: nemodiff_train/orchestrate.py
    return TrainOutcome(run_dir, finished=not stopped, on_main=work.run, message=sink.message, close=sink.close)


def _run_stage(cfg, stage, stage_index, first, last, env, dlm, par: Parallelized, optim, order, sample_offset,
               train_ds, val_ds, weights, mask_id, progress, sink, stop, run_dir, validation_hooks=(),
               work: MainWork | None = None, hook_memo: dict[int, dict] | None = None) -> bool:
    wrapped = par.module
    d = cfg.diffusion
    seq_len = train_ds.meta["seq_len"]
    t_last, tokens_since = time.perf_counter(), 0
    while progress.step < last:
        local = progress.step - first
        lr = lr_at(local, stage.steps, name=cfg.schedule.name, peak=stage.lr or cfg.optim.lr,
                   minimum=cfg.optim.min_lr, warmup_fraction=cfg.schedule.warmup_fraction,
                   decay_fraction=cfg.schedule.decay_fraction)
        for group in optim.param_groups:
            group["lr"] = lr
        micro = []
        for positions in rank_positions(local, stage.global_batch_size, env.rank, env.world_size,
                                        stage.micro_batch_size):
            rows = [train_ds[order.row(p)] for p in positions]
            micro.append(collate(rows, [sample_offset + p for p in positions], seed=cfg.run.seed,
                                 mask_token_id=mask_id, schedule=d.schedule, eps=d.eps, block_size=d.block_size,
                                 half_life_ratio=d.half_life_ratio).to(env.device))
        local_den = sum(mb.masked_count + weights.beta * mb.ar_count for mb in micro)
        global_den = float(all_reduce_sum(torch.tensor([local_den], dtype=torch.float64, device=env.device)).item())
        step_parts = LossParts(*(torch.zeros((), device=env.device) for _ in range(4)))
        for i, mb in enumerate(micro):
            sync = i == len(micro) - 1 or not hasattr(wrapped, "no_sync")
            ctx = contextlib.nullcontext() if sync else wrapped.no_sync()
            with ctx:
                with par.compute_context(env.device):
                    parts = wrapped(mb)
                (parts.numerator(weights) * (env.world_size / global_den)).backward()
            step_parts = step_parts + parts.detached()
        fault_point("step")  # NEMODIFF_FAULT=step:<n>: a fault between backward and update
        grad_norm = torch.nn.utils.clip_grad_norm_(dlm.parameters(), cfg.optim.grad_clip)
        optim.step()
        optim.zero_grad(set_to_none=True)
        progress.step += 1
        step_tokens = stage.global_batch_size * seq_len
        progress.tokens += step_tokens
        tokens_since += step_tokens

        if progress.step % cfg.logging.every == 0 or progress.step == last:
            total = _reduce_parts(step_parts, env.device)
            now = time.perf_counter()
            record = {"step": progress.step, "stage": stage.name,
                      "loss": (total.numerator(weights) / total.denominator(weights)).item(),
                      "ar_loss": (total.ar_sum / total.ar_count.clamp_min(1)).item(),
                      "diffusion_loss": (total.diffusion_sum / total.diffusion_count.clamp_min(1)).item(),
                      "masked_tokens": int(total.diffusion_count.item()), "lr": lr,
                      "grad_norm": float(grad_norm), "tokens": progress.tokens,
                      "tokens_per_s": tokens_since / max(now - t_last, 1e-9), **total.term_means()}
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"non-finite loss at step {progress.step}: {record}")
            sink.log(record)
            sink.progress(progress.step, {"loss": record["loss"], "tok/s": record["tokens_per_s"]})
            t_last, tokens_since = now, 0
        if cfg.logging.val_every > 0 and (progress.step % cfg.logging.val_every == 0 or progress.step == last):
            val = _validation_row(par, val_ds, cfg, stage, env, mask_id, validation_hooks, work, progress.step,
                                  hook_memo)
            if val:
                sink.log({"step": progress.step, "stage": stage.name, **val})
        interrupted = stop.agreed(env.device)
        if interrupted or progress.step % cfg.checkpoint.every == 0 or progress.step == last:
            path = save_checkpoint(run_dir, progress.step, _state(dlm, optim, with_optim=True),
                                   {"step": progress.step, "tokens": progress.tokens, "stage": stage_index,
                                    "stage_name": stage.name, "recipe": cfg.recipe},
                                   cfg.checkpoint.keep_last)
            if interrupted:
                sink.message(f"signal {stop.signal}: saved {path}; exiting so the next job resumes")
                sink.log({"step": progress.step, "event": "preempted", "signal": stop.signal})
                return True
    return False
