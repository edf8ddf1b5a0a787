"""The torch engine: one process or ``torchrun`` (DDP or FSDP2), CPU (gloo) or CUDA (nccl).

A run is a list of stages (e.g. joint AR + diffusion continued pretraining, then SFT) over one model;
the global step counts on across stages and each stage gets a fresh AdamW and its own LR schedule.
:func:`train` opens a :class:`Run` (what every stage shares) and runs one :class:`StageRun` per
stage. Each optimizer step (:meth:`StageRun.step`):

1. every rank noises its micro-batches (noise seeded per sample, see ``batches.py``);
2. the global loss denominator ``N_mask + β·N_AR`` of the whole step is all-reduced *before* the
   forward, so each micro-batch backpropagates ``numerator · world / global_denominator`` and the
   data-parallel gradient average equals the gradient of the global per-token mean (docs/method.md:
   the loss is a global token mean, not a mean of per-batch means; ``loss.py``);
3. clip, step, log. Checkpoints every ``checkpoint.every`` steps, at stage ends, and on SIGTERM /
   SIGUSR1 (then exit 0, so a preempted Slurm job's successor resumes).

With ``adapter=lora`` (docs/adapters.md) the base is frozen and only the drafter adapter trains
(:func:`~.state.trained_module`: it is what the optimizer holds and what checkpoints save; the base
is reloaded from ``model.path`` on resume). The noisy half runs with the adapter on and the clean
half with it off, so the diffusion term trains the adapter; the AR term is still computed and logged
(it is the frozen base's AR loss and stays constant) and stays in the loss denominator, but no
trainable parameter reaches it.

The engine only trains: export and evaluation at the end are :mod:`nemodiff_train.orchestrate`'s.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from pathlib import Path
from typing import Sequence

import torch

from ... import runs
from ...config.errors import ConfigError
from ...config.load import as_dict, save_config
from ...config.schema import Config
from ...data.order import GlobalOrder
from ...faults import fault_point
from ...models.context_parallel import use_cp_attention
from ...models.hf import DLMModel
from ...models.step import MicroBatch, collate, noise_settings
from .. import TrainOutcome
from .batches import rank_positions
from .checkpointing import load_checkpoint, model_identity, read_trainer_state, restore_rng, resume_checkpoint, save_checkpoint
from .context import ParallelDims, parallel_dims
from .distributed import DistEnv, all_reduce_sum, init_distributed
from .loss import JointObjective, LossTerm, StepParts, TwoStreamLoss, soft_target_terms, soft_target_weights
from .lr_schedule import lr_at
from .main_work import MainWork
from .metrics import MetricsSink, WandbRun
from .parallelize import Parallelized, cpu_precision_note, parallelize
from .setup import build_model, build_teacher, prepare_stage_data
from .state import Progress, TrainState, make_optimizer
from .validation import ValidationHook, Validator

log = logging.getLogger(__name__)

__all__ = ["train", "Run", "StageRun"]


class StopFlag:
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


class Run:
    """What every stage of one run shares, set up once (process group, model, resume point, metrics).

    Attributes:
        cfg, run_dir, env, work: the config, run directory, process group and rank-0 work runner.
        dlm, par: the model and its parallelized loss module (``par.module`` is what steps call).
        state: the checkpointed state (model, optimizer, :class:`~.state.Progress`).
        loss_fn: the :class:`~.loss.JointObjective` (the seam for extra loss terms, see :class:`StageRun`).
        sink, stop, validator: metrics writer, signal flag, validation.
        ckpt: the checkpoint still to load (resume), consumed by the first stage that trains.
    """

    def __init__(self, cfg: Config, run_dir: Path, hooks: Sequence[ValidationHook] = (),
                 loss_terms: Sequence[LossTerm] = ()):
        self.stop = StopFlag()  # first: under Slurm the launcher leaves TERM/USR1 ignored until we take them
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.env = init_distributed(cfg.engine.device, timeout_s=cfg.engine.dist_timeout_s)
        self.dims: ParallelDims = parallel_dims(self.env, cfg.engine.cp)  # data × context mesh (engine.cp)
        torch.manual_seed(cfg.run.seed)
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / runs.CONFIG_FILE)
        self.work = MainWork(self.env, self.run_dir, cfg.engine.main_work_timeout_s)
        self.dlm = build_model(cfg, self.run_dir, self.env, self.work)
        if self.dims.cp > 1:
            if loss_terms:
                raise ConfigError(f"engine.cp={self.dims.cp}: extra loss terms are not verified under context "
                                  "parallelism; train them with engine.cp=1")
            use_cp_attention(self.dlm.hf)  # attention gathers keys/values over the CP group (docs/context_parallel.md)
        self.state = TrainState(self.dlm, Progress())
        # the newest checkpoint that verifies against this model; all failing is an error, never step 0
        self.ckpt, notes = (resume_checkpoint(self.run_dir, model_identity(self.state.model_identity_state()))
                            if cfg.checkpoint.resume else (None, []))
        if self.ckpt:
            self.state.restore_progress(read_trainer_state(self.ckpt))
        self.sink = MetricsSink(self.run_dir, enabled=self.env.is_main, total_steps=cfg.total_steps,
                                start_step=self.progress.step, progress_bar=cfg.logging.progress_bar,
                                wandb=WandbRun(cfg.logging.wandb, as_dict(cfg),
                                               cfg.run.name or cfg.recipe or self.run_dir.name))
        self._announce(notes)
        d = cfg.diffusion
        terms = [*soft_target_terms(cfg), *loss_terms]  # diffusion.drafter_kl / certainty / teacher_kl, then the caller's
        teacher = build_teacher(cfg, self.env, self.work)
        self.par = parallelize(TwoStreamLoss(self.dlm, d.block_size, d.loss_chunk_size, terms, soft_target_weights(cfg),
                                             teacher, skip_unmasked=cfg.engine.skip_unmasked_blocks), cfg, self.env)
        precision = cpu_precision_note(self.par.precision, self.env.device)  # what bf16 means on this CPU
        if precision:
            self.sink.message(precision)
        self.loss_fn = JointObjective.from_config(cfg, terms)
        self.validator = Validator(cfg, self.env, self.par, self.work, hooks, self.dims)

    @property
    def progress(self) -> Progress:
        return self.state.progress

    def _announce(self, notes: list[str]) -> None:
        """The run's opening messages: skipped checkpoints, the adapter's size, the resume point."""
        for note in notes:
            self.sink.message(note)
        adapter = self.dlm.adapter
        if adapter is not None:
            base = sum(p.numel() for p in self.dlm.hf.parameters())
            self.sink.message(f"adapter=lora: base frozen ({base:,} parameters); training {adapter.trainable_parameters():,} "
                              f"(LoRA r={adapter.rank} on {len(adapter.paths)} linear layers + the mask row)")
        if self.dims.cp > 1:
            d = self.dims
            self.sink.message(f"engine.cp={d.cp}: {d.dp} data-parallel group(s) x {d.cp} context-parallel ranks; each "
                              f"rank holds 2L/{d.cp} positions of every row (docs/context_parallel.md)")
        if self.ckpt:
            self.sink.message(f"resuming from {self.ckpt} (step {self.progress.step})")

    def stage_bounds(self, index: int) -> tuple[int, int]:
        """Global steps before stage ``index``'s first step and at its end."""
        first = sum(s.steps for s in self.cfg.stages[:index])
        return first, first + self.cfg.stages[index].steps


class StageRun:
    """One stage of a :class:`Run`: its data, order, optimizer and schedule, and the steps over them.

    Methods, in the order :meth:`run` calls them: :meth:`maybe_validate` (at the stage's start),
    then per optimizer step :meth:`step` (:meth:`micro_batches` → :meth:`forward_backward` → clip
    and update), :meth:`log_step`, :meth:`maybe_validate`, :meth:`maybe_checkpoint`.

    Extra loss terms plug in at two places that share the same term objects: each
    :class:`~.loss.LossTerm` runs inside the wrapped module's forward (:class:`~.loss.TwoStreamLoss`,
    on a :class:`~.loss.TwoStreamForward`: the micro-batch, its ``[m, 2L, d]`` hidden states of both
    streams and the model's head, i.e. both views' logits) and returns ``(sum, count)``; the run's
    ``loss_fn`` (:class:`~.loss.JointObjective`) all-reduces every term's count with the joint
    denominator before the forward (:meth:`forward_backward`), adds ``weight · sum / global count`` to
    what each micro-batch backpropagates, and logs ``<name>_loss``. Pass terms to :func:`train`
    (``loss_terms``, or ``TrainOptions.loss_terms`` through the orchestration) or :class:`Run`. A
    subclass may instead override :meth:`forward_backward` (it returns the step's detached
    :class:`~.loss.StepParts`, which :meth:`log_step` reduces with ``loss_fn.metrics``).

    Attributes:
        shared: the :class:`Run` (``dlm``, ``par``, ``state``, ``stop``, ``validator``, ``work``).
        cfg, env, sink, loss_fn: the run's config, process group, metrics sink and objective.
        index, stage, first, last: the stage, its index, and the global steps before its first step
            and at its end.
        train_ds, val_ds, order, sample_offset: its prepared data, global data order, and the
            number of samples earlier stages consumed (seeds the noise).
        optim: its AdamW (fresh per stage; restored from a checkpoint inside the same stage).
    """

    def __init__(self, run: Run, index: int):
        self.shared = run
        self.cfg, self.env, self.sink, self.loss_fn = run.cfg, run.env, run.sink, run.loss_fn
        self.index = index
        self.stage = run.cfg.stages[index]
        self.first, self.last = run.stage_bounds(index)
        st = self.stage
        self.sink.start_stage(st.name, index, len(self.cfg.stages), self.first, self.last, self.progress.step,
                              detail=f"{st.kind}, {st.global_batch_size} rows x {st.data.seq_len} tokens per step")
        self.optim = make_optimizer(run.dlm, run.cfg, self.stage)
        if run.ckpt is not None:
            self._resume(run.ckpt)
            run.ckpt = None
        # after the resume: a distill stage with teacher=current generates its set with these weights
        self.train_ds, self.val_ds = prepare_stage_data(run.cfg, index, run.run_dir, run.work, run.dlm)
        self.order = GlobalOrder(len(self.train_ds), run.cfg.run.seed, index)
        self.sample_offset = sum(s.steps * s.global_batch_size for s in run.cfg.stages[:index])
        self._t_last, self._tokens_since = time.perf_counter(), 0

    @property
    def progress(self) -> Progress:
        return self.shared.progress

    def _resume(self, ckpt: Path) -> None:
        """Load the weights always, the optimizer only inside the same stage, and the RNG streams."""
        same_stage = self.first < self.progress.step
        state = self.shared.state.tensors(self.optim, with_optim=same_stage)
        load_checkpoint(ckpt, state)
        self.shared.state.load_tensors(self.optim, state)
        note = restore_rng(ckpt, self.env.rank, self.env.world_size)  # dropout etc.; noise and data order are seeded
        if note:
            self.sink.message(note)

    def run(self) -> bool:
        """Train the stage to its end; ``True`` when a signal stopped it (after a checkpoint)."""
        try:
            if self.progress.step == self.first:
                self.maybe_validate(at_start=True)
            self._t_last = time.perf_counter()
            while self.progress.step < self.last:
                parts, lr, grad_norm = self.step()
                self.log_step(parts, lr, grad_norm)
                self.maybe_validate()
                if self.maybe_checkpoint():
                    return True
            return False
        finally:
            self.sink.end_stage()

    def lr(self) -> float:
        """The learning rate of the next step (the stage's own schedule)."""
        c = self.cfg
        return lr_at(self.progress.step - self.first, self.stage.steps, name=c.schedule.name,
                     peak=self.stage.lr or c.optim.lr, minimum=c.optim.min_lr,
                     warmup_fraction=c.schedule.warmup_fraction, decay_fraction=c.schedule.decay_fraction)

    def micro_batches(self) -> list[MicroBatch]:
        """This rank's noised micro-batches of the next step, on the device."""
        d, st = self.cfg.diffusion, self.stage
        mask_id = self.shared.dlm.settings.mask_token_id
        out = []
        dims = self.shared.dims  # rows are split over the data-parallel ranks; a CP group shares them
        for positions in rank_positions(self.progress.step - self.first, st.global_batch_size, dims.dp_rank,
                                        dims.dp, st.micro_batch_size):
            rows = [self.train_ds[self.order.row(p)] for p in positions]
            mb = collate(rows, [self.sample_offset + p for p in positions], seed=self.cfg.run.seed,
                         mask_token_id=mask_id, **noise_settings(d))
            out.append(dims.on_shard(mb).to(self.env.device))
        return out

    def forward_backward(self, micro: list[MicroBatch]) -> StepParts:
        """Forward and backward of every micro-batch (gradients synchronised on the last one);
        returns the step's summed, detached parts on this rank."""
        env, wrapped = self.env, self.shared.par.module
        local = self.loss_fn.local_denominators(micro)
        global_dens = all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=env.device)).tolist()
        step_parts = StepParts.zeros(env.device, [t.name for t in self.loss_fn.terms])
        for i, mb in enumerate(micro):
            sync = i == len(micro) - 1 or not hasattr(wrapped, "no_sync")
            with contextlib.nullcontext() if sync else wrapped.no_sync():
                with self.shared.par.compute_context(env.device):
                    parts = wrapped(mb)
                self.loss_fn.backward_scalar(parts, global_dens, env.world_size).backward()
            step_parts = step_parts + parts.detached()
        return step_parts

    def step(self) -> tuple[StepParts, float, torch.Tensor]:
        """One optimizer step; returns this rank's loss parts, the LR and the gradient norm."""
        lr = self.lr()
        for group in self.optim.param_groups:
            group["lr"] = lr
        parts = self.forward_backward(self.micro_batches())
        fault_point("step")  # NEMODIFF_FAULT=step:<n>: a fault between backward and update
        grad_norm = torch.nn.utils.clip_grad_norm_(self.shared.dlm.parameters(), self.cfg.optim.grad_clip)
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        step_tokens = self.stage.global_batch_size * self.train_ds.meta["seq_len"]
        self.progress.step += 1
        self.progress.tokens += step_tokens
        self._tokens_since += step_tokens
        return parts, lr, grad_norm

    def _due(self, every: int) -> bool:
        return self.progress.step % every == 0 or self.progress.step == self.last

    def log_step(self, parts: StepParts, lr: float, grad_norm: torch.Tensor) -> None:
        """Every ``logging.every`` steps and at the stage's end: the step's global losses."""
        if not self._due(self.cfg.logging.every):
            return
        total = parts.all_reduced(self.env.device)
        now = time.perf_counter()
        record = {"step": self.progress.step, "stage": self.stage.name, **self.loss_fn.metrics(total), "lr": lr,
                  "grad_norm": float(grad_norm), "tokens": self.progress.tokens,
                  "tokens_per_s": self._tokens_since / max(now - self._t_last, 1e-9)}
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"non-finite loss at step {self.progress.step}: {record}")
        self.sink.log(record)
        self.sink.progress(self.progress.step, {"loss": record["loss"], "tok/s": record["tokens_per_s"]})
        self._t_last, self._tokens_since = now, 0

    def maybe_validate(self, at_start: bool = False) -> None:
        """Validate every ``logging.val_every`` steps, at the stage's end, and (``at_start``) before its first step."""
        every = self.cfg.logging.val_every
        if every <= 0 or not (at_start or self._due(every)):
            return
        row = self.shared.validator.row(self.val_ds, self.stage.micro_batch_size, self.progress.step)
        if row or at_start:
            self.sink.log({"step": self.progress.step, "stage": self.stage.name, **row})

    def maybe_checkpoint(self) -> bool:
        """Save every ``checkpoint.every`` steps, at the stage's end, and on a signal; ``True`` when
        a signal asked the run to stop (the checkpoint is saved)."""
        interrupted = self.shared.stop.agreed(self.env.device)
        if not (interrupted or self._due(self.cfg.checkpoint.every)):
            return False
        state = self.shared.state
        path = save_checkpoint(self.shared.run_dir, self.progress.step, state.tensors(self.optim),
                               state.json(self.index, self.stage.name, self.cfg.recipe), self.cfg.checkpoint.keep_last)
        if interrupted:
            stop = self.shared.stop
            self.sink.message(f"signal {stop.signal}: saved {path}; exiting so the next job resumes")
            self.sink.log({"step": self.progress.step, "event": "preempted", "signal": stop.signal})
        return interrupted


def train(cfg: Config, run_dir: Path, validation_hooks: Sequence[ValidationHook] = (),
          loss_terms: Sequence[LossTerm] = ()) -> TrainOutcome:
    """Run (or resume) every stage of ``cfg`` in ``run_dir``.

    Returns a :class:`~nemodiff_train.engines.TrainOutcome`: ``finished`` unless a signal stopped the
    run; the caller (:mod:`nemodiff_train.orchestrate`) exports and evaluates, then closes the metrics.

    Args:
        validation_hooks: run on rank 0 after every validation, with the unwrapped model; their
            metrics join the validation row (``nemodiff-train`` passes the decode probe here).
        loss_terms: extra :class:`~.loss.LossTerm` s added to the joint loss (see :class:`StageRun`).
    """
    run = Run(cfg, run_dir, validation_hooks, loss_terms)
    stopped = False
    for index in range(len(cfg.stages)):
        if run.progress.step >= run.stage_bounds(index)[1]:
            continue
        stopped = StageRun(run, index).run()
        if stopped:
            break
    # what follows training (export, evaluation) is the orchestration's: nemodiff_train/orchestrate.py
    return TrainOutcome(run.run_dir, finished=not stopped, on_main=run.work.run, message=run.sink.message,
                        close=run.sink.close)
