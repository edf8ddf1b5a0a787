"""One Megatron-Bridge training job (one stage) of a recipe with ``engine=megatron``, in two steps:
``build_job(cfg) -> MegatronJob`` (everything ``pretrain`` needs) and ``launch(job)``; ``run(cfg)`` is both.

Launch (one process per GPU; every rank runs the same command, ``run.dir`` on a shared filesystem)::

    torchrun --nproc_per_node 8 -m nemodiff_train.cli.train recipe=nld_8b_pretrain engine.stage_index=0 \
        run.dir=/lustre/runs/nld8b

What a job does:

1. (:func:`build_job`) rank 0 writes the HF directory training starts from when the source needs a mask token or an
   untied head (:func:`.model.prepare_init_checkpoint`), tokenizes + packs the stage's data (the same
   ``nemodiff_train.data`` preparation as the torch engine) and converts it to Megatron indexed
   datasets (:func:`.data.convert_prepared`); the other ranks wait for its marker files;
2. :func:`.config.to_container` builds the ``ConfigContainer``; (:func:`launch`) ``pretrain`` runs with
   :class:`.step.TwoStreamForwardStep`; ``metrics.jsonl`` gets one line per logged step;
3. on SIGTERM or SIGUSR1 Megatron-Bridge saves a checkpoint and the process exits 0; running the
   same command again resumes (optimizer, scheduler, step, data position);
4. after the last stage it returns ``finished``; with ``export.at_end`` the orchestration
   (:mod:`nemodiff_train.orchestrate`) then has rank 0 convert the latest checkpoint
   (:func:`.export.convert_run`) and write ``<run.dir>/hf`` with the one exporter of both engines.

Tests drive the steps apart: :func:`build_job` prepares and translates without starting Megatron
(the returned container is an ordinary config object a test may inspect or adjust), :func:`launch`
runs ``pretrain`` on it and tears the process group down.

Nothing here imports Megatron at module level: ``import nemodiff_train.engines.megatron.train``
works without it, and :func:`build_job` says what to install when it is missing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...config.schema import Config
from ... import runs
from .. import TrainOutcome
from ..ranks import rank, world_size

log = logging.getLogger(__name__)

__all__ = ["run", "build_job", "launch", "MegatronJob", "prepare_stage", "metrics_callback"]


def _wait_for(path: Path, what: str, timeout_s: float = 6 * 3600) -> None:
    t0 = time.time()
    while not path.is_file():
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"rank {rank()}: gave up waiting for {what} ({path})")
        time.sleep(2)


def _require_megatron() -> None:
    try:
        import megatron.bridge  # noqa: F401
        import megatron.core  # noqa: F401
    except ImportError as e:
        raise ImportError("engine=megatron needs megatron-core==0.19.2 and megatron-bridge==0.6.2 "
                          "(see tests/megatron/INSTALL.md, or use NVIDIA's NeMo container)") from e


def prepare_stage(cfg: Config, run_dir: Path, stage_index: int, hf_dir: Path) -> tuple[list[str], list[str]]:
    """Rank 0: prepared data → indexed datasets; everyone: the (train, valid) blends."""
    from ...data.stage import prepare_stage as prepare_data
    from .data import MARKER, convert_prepared

    stage = cfg.stages[stage_index]
    out = runs.megatron_data_dir(run_dir, stage_index, stage.name)
    if rank() == 0:
        convert_prepared(prepare_data(cfg, stage_index, run_dir, tokenizer=hf_dir), out)
    _wait_for(out / MARKER, "the converted data", cfg.engine.main_work_timeout_s)
    prefixes = json.loads((out / MARKER).read_text())["prefixes"]
    train = [prefixes["train"]] if prefixes.get("train") else []
    valid = [prefixes["val"]] if prefixes.get("val") else []
    if not train:
        raise ValueError(f"stage {stage.name!r}: the prepared data has no training rows")
    return train, valid


def metrics_callback(path: Path, *, step_offset: int, stage_name: str, tokens_per_step: int):
    """A ``megatron.bridge.training.callbacks.Callback`` writing ``metrics.jsonl`` on the last rank.

    Records: ``step`` (global across stages), ``stage``, ``loss``, ``ar_loss``, ``diffusion_loss``,
    ``lr``, ``grad_norm``, ``tokens_per_s`` (clean tokens: global batch × L per step); validation
    lines carry ``val_loss``, ``val_ar_loss``, ``val_diffusion_loss``.
    """
    from megatron.bridge.training.callbacks import Callback

    def _f(v):
        try:
            return float(v.float().mean()) if hasattr(v, "float") else float(v)
        except Exception:
            return None

    class _Writer(Callback):
        def __init__(self):
            self.t0 = None
            self.enabled = rank() == world_size() - 1  # the last pipeline stage holds the reduced losses

        def _write(self, rec):
            if self.enabled:
                with open(path, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")

        def on_train_step_start(self, context):
            self.t0 = time.perf_counter()

        def on_train_step_end(self, context):
            losses = context.loss_dict or {}
            if not losses:
                return
            dt = time.perf_counter() - (self.t0 or time.perf_counter())
            it = int(context.state.train_state.step) + 1  # counted after the callback
            lr = None
            if context.optimizer is not None:
                try:
                    lr = float(context.optimizer.param_groups[0]["lr"])
                except Exception:
                    lr = None
            self._write({"step": step_offset + it, "stage": stage_name, "loss": _f(losses.get("lm loss")),
                         "ar_loss": _f(losses.get("ar_loss")), "diffusion_loss": _f(losses.get("diffusion_loss")),
                         "lr": lr, "grad_norm": _f(context.grad_norm) if context.grad_norm is not None else None,
                         "skipped": bool(context.skipped_iter), "step_time_s": dt,
                         "tokens_per_s": tokens_per_step / dt if dt > 0 else None})

        def on_eval_end(self, context):
            losses = context.total_loss_dict or {}
            if not losses:
                return
            it = int(context.state.train_state.step)
            self._write({"step": step_offset + it, "stage": stage_name, "val_loss": _f(losses.get("lm loss")),
                         "val_ar_loss": _f(losses.get("ar_loss")),
                         "val_diffusion_loss": _f(losses.get("diffusion_loss"))})

    return _Writer()


def _forward_sigusr1() -> None:
    """Slurm's ``--signal=USR1@<s>`` and SIGTERM both mean "save and stop": forward SIGUSR1 as SIGTERM,
    which Megatron-Bridge's exit-signal handler (``train.exit_signal_handler``) turns into a checkpoint
    and exit code 0 at the next iteration boundary."""
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))


@dataclass
class MegatronJob:
    """What :func:`launch` hands to ``megatron.bridge.training.pretrain.pretrain``, and where.

    Attributes:
        cfg: the run's config.
        run_dir: ``run.dir`` (shared by every rank and every job of a chain).
        stage_index: the stage this job trains.
        hf_dir: the HF directory stage 0 starts from (:func:`.model.prepare_init_checkpoint`).
        container: the ``ConfigContainer`` (:func:`.config.to_container`).
        forward_step: ``forward_step(state, data_iterator, model)`` (:class:`.step.TwoStreamForwardStep`).
        callbacks: ``pretrain`` callbacks, the ``metrics.jsonl`` writer first.
        finished_iteration: the latest checkpoint's iteration of this stage (``None``: none yet); at
            ``steps`` or beyond, :func:`launch` trains nothing (a requeued job of a finished stage).
    """

    cfg: Config
    run_dir: Path
    stage_index: int
    hf_dir: Path
    container: Any
    forward_step: Any
    callbacks: list = field(default_factory=list)
    finished_iteration: int | None = None

    @property
    def done(self) -> bool:
        it = self.finished_iteration
        return it is not None and it >= self.cfg.stages[self.stage_index].steps


def build_job(cfg: Config, *, forward_step=None, callbacks=()) -> MegatronJob:
    """Check ``cfg``, save it, write the HF init directory and the stage's data (rank 0), translate.

    Starts no process group and builds no model: that is :func:`launch`'s.

    Args:
        forward_step: replaces :class:`.step.TwoStreamForwardStep` (tests).
        callbacks: more ``pretrain`` callbacks after the metrics writer.
    """
    _require_megatron()
    from ...config.load import save_config
    from ...models.step import noise_settings
    from .config import select_stage, stage_checkpoint_dir, to_container
    from .export import finished_iteration
    from .model import mask_token_id_of, prepare_init_checkpoint
    from .step import TwoStreamForwardStep

    if not cfg.run.dir:
        raise ValueError("run.dir must be set for engine=megatron (shared by every rank and every job)")
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    i = select_stage(cfg)
    stage = cfg.stages[i]
    save_dir = stage_checkpoint_dir(run_dir, cfg, i)
    if not cfg.checkpoint.resume and (save_dir / runs.MEGATRON_LATEST).is_file():
        raise FileExistsError(f"checkpoint.resume=false but {save_dir} already holds a checkpoint; "
                              "use a new run.dir or checkpoint.resume=true")
    if i > 0 and not (stage_checkpoint_dir(run_dir, cfg, i - 1) / runs.MEGATRON_LATEST).is_file() \
            and not (save_dir / runs.MEGATRON_LATEST).is_file():
        raise FileNotFoundError(f"stage {i} ({stage.name}) starts from stage {i - 1}'s checkpoint, which is not in "
                                f"{stage_checkpoint_dir(run_dir, cfg, i - 1)}; run engine.stage_index={i - 1} first")
    if rank() == 0:
        save_config(cfg, run_dir / runs.CONFIG_FILE)

    hf_dir = prepare_init_checkpoint(cfg, run_dir, is_main=rank() == 0)
    train_blend, valid_blend = prepare_stage(cfg, run_dir, i, hf_dir)
    container = to_container(cfg, run_dir=run_dir, hf_dir=hf_dir, train_blend=train_blend, valid_blend=valid_blend,
                             stage_index=i, cpu=cfg.engine.device == "cpu")
    d = cfg.diffusion
    step = forward_step or TwoStreamForwardStep(
        mask_token_id=mask_token_id_of(cfg, hf_dir), **noise_settings(d), alpha=d.alpha, beta=d.beta)
    offset = sum(s.steps for s in cfg.stages[:i])
    cbs = [metrics_callback(run_dir / runs.METRICS_FILE, step_offset=offset, stage_name=stage.name,
                           tokens_per_step=stage.global_batch_size * stage.data.seq_len), *callbacks]
    return MegatronJob(cfg, run_dir, i, hf_dir, container, step, cbs, finished_iteration(save_dir))


def launch(job: MegatronJob) -> TrainOutcome:
    """Run ``pretrain`` on ``job`` (unless its stage already finished), then destroy the process group.

    Returns a :class:`~nemodiff_train.engines.TrainOutcome`, ``finished`` after the last stage (the
    orchestration then exports); a signal ends the process inside ``pretrain`` instead (exit 0).
    """
    from megatron.bridge.training.pretrain import pretrain

    cfg, i = job.cfg, job.stage_index
    stage = cfg.stages[i]
    if cfg.logging.wandb.project:
        os.environ.setdefault("WANDB_MODE", cfg.logging.wandb.mode)
    _forward_sigusr1()
    if job.done:  # a requeued job of a finished stage: nothing to train
        log.info("stage %d (%s) already finished at iteration %d", i, stage.name, job.finished_iteration)
    else:
        pretrain(job.container, job.forward_step, callbacks=job.callbacks)  # SIGTERM/SIGUSR1: SystemExit(0) inside

    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # the export at the end is the orchestration's (nemodiff_train/orchestrate.py): rank 0 alone,
    # the process group is gone, so the other ranks return at once
    return TrainOutcome(job.run_dir, finished=i == len(cfg.stages) - 1, on_main=_on_rank0, message=log.info)


def run(cfg: Config, *, forward_step=None, callbacks=()) -> TrainOutcome:
    """Train stage ``engine.stage_index`` of ``cfg``: :func:`launch` of :func:`build_job`."""
    return launch(build_job(cfg, forward_step=forward_step, callbacks=callbacks))


def _on_rank0(name: str, fn):
    return fn() if rank() == 0 else None
