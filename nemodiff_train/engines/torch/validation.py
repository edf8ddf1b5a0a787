"""Validation of the torch engine: held-out losses with fixed noise, plus rank-0 hooks (decode probes).

:class:`Validator` holds what a stage's validation needs; :meth:`Validator.row` is one validation
row. The same ``logging.val_batches × micro_batch_size`` rows are used whatever the world size, each
noised from its own index, so the result equals the one-process loss (up to summation order).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ...config.schema import Config
from ...core.losses import MASK_RATE_EDGES, LossWeights
from ...models.hf import DLMModel
from ...models.step import VALIDATION_SEED_OFFSET
from ...models.step import collate, noise_settings
from .context import ParallelDims, parallel_dims
from .distributed import DistEnv, all_reduce_sum
from .loss import StepParts
from .main_work import MainWork
from .parallelize import Parallelized

__all__ = ["ValidationHook", "Validator", "validation_split", "mask_rate_metrics"]

ValidationHook = Callable[[DLMModel], dict]
"""Runs on rank 0 after every validation with the unwrapped model; returns metrics for the row."""


def validation_split(n: int, world: int, rank: int, micro: int) -> list[list[int | None]]:
    """This rank's validation micro-batches over rows ``0..n-1``: row ``i`` goes to rank ``i % world``,
    and every rank gets the SAME number of micro-batches of ``micro`` rows, padded with ``None``
    (a padding row: computed, contributes zero). Under FSDP2 every forward all-gathers, so a rank
    with fewer forwards than the others would leave them waiting forever."""
    mine: list[int | None] = list(range(rank, n, world))
    forwards = max(1, math.ceil(math.ceil(n / world) / micro))
    mine += [None] * (forwards * micro - len(mine))
    return [mine[i:i + micro] for i in range(0, len(mine), micro)]


def mask_rate_metrics(stats: torch.Tensor) -> dict[str, float]:
    """``val_masked_token_accuracy`` and the unweighted masked-token CE per masking-rate bucket
    (``val_diffusion_ce_p0.25-0.50`` ...) from ``[buckets, 3]`` :func:`masked_token_stats` sums."""
    ce, hits, count = stats.sum(0).tolist()
    out = {"val_masked_token_accuracy": hits / count if count else float("nan")}
    for (lo, hi), (b_ce, _, b_count) in zip(zip(MASK_RATE_EDGES, MASK_RATE_EDGES[1:]), stats.tolist()):
        if b_count:
            out[f"val_diffusion_ce_p{lo:.2f}-{hi:.2f}"] = b_ce / b_count
    return out


class Validator:
    """One run's validation: losses on a stage's validation rows, then the hooks on rank 0.

    Rank 0 runs the hooks while the other ranks wait on a file (``main_work.py``), not in a
    collective, so a slow hook neither desynchronises the steps nor trips the process-group
    time-out. A stage's first validation runs at the step where the previous stage's last one ran,
    on the same weights, so the hooks' row is remembered by step and not measured twice (the losses
    are, on the new stage's validation data).
    """

    def __init__(self, cfg: Config, env: DistEnv, par: Parallelized, work: MainWork,
                 hooks: Sequence[ValidationHook] = (), dims: ParallelDims | None = None):
        self.cfg, self.env, self.par, self.work = cfg, env, par, work
        self.dims = dims or parallel_dims(env, 1)  # no context parallelism: the data ranks are the world
        self.hooks = list(hooks)
        self.mask_id = par.loss_module.dlm.settings.mask_token_id
        self._hook_rows: dict[int, dict] = {}  # step -> the hooks' row

    def row(self, val_ds, micro_batch_size: int, step: int) -> dict:
        """Validation losses of ``val_ds`` and the hooks' metrics at ``step`` (``{}`` without data or hooks)."""
        row = self.losses(val_ds, micro_batch_size)
        if self.hooks:
            if step not in self._hook_rows:
                self._hook_rows[step] = self.work.run(f"validation_hooks_{step}", self._run_hooks) or {}
            row.update(self._hook_rows[step])
        return row

    def _run_hooks(self) -> dict:
        out: dict = {}
        for hook in self.hooks:
            out.update(hook(self.par.loss_module.dlm))
        return out

    def _micro_batch(self, val_ds, idx: list[int | None]):
        rows = []
        for i in idx:
            row = dict(val_ds[0 if i is None else i])
            if i is None:  # padding: no supervised token, so no AR target and nothing masked
                row["loss_mask"] = torch.zeros_like(torch.as_tensor(row["loss_mask"]), dtype=torch.bool)
            rows.append(row)
        d = self.cfg.diffusion
        mb = collate(rows, [0 if i is None else i for i in idx], seed=self.cfg.run.seed + VALIDATION_SEED_OFFSET,
                     mask_token_id=self.mask_id, **noise_settings(d))
        return self.dims.on_shard(mb)  # a context-parallel rank: its slice of the same rows

    @torch.no_grad()
    def losses(self, val_ds, micro_batch_size: int) -> dict:
        """Held-out AR loss (mean next-token CE), diffusion loss (Σ CE/p per masked token), their
        joint loss and the masked-token accuracy per masking-rate bucket; fixed noise."""
        if val_ds is None or len(val_ds) == 0:
            return {}
        env, d = self.env, self.cfg.diffusion
        n = min(len(val_ds), self.cfg.logging.val_batches * micro_batch_size)
        total = StepParts.zeros(env.device)
        stats = torch.zeros(len(MASK_RATE_EDGES) - 1, 3, dtype=torch.float64, device=env.device)
        module = self.par.loss_module
        module.eval()
        for idx in validation_split(n, self.dims.dp, self.dims.dp_rank, micro_batch_size):
            with self.par.compute_context(env.device):
                parts, mb_stats = module(self._micro_batch(val_ds, idx).to(env.device), diagnostics=True)
            total = total + parts.detached()
            stats += mb_stats
        module.train()
        total = total.all_reduced(env.device)
        all_reduce_sum(stats)
        w = LossWeights(d.alpha, d.beta)
        terms = {f"val_{name}_loss": (s / c.clamp_min(1)).item() for name, (s, c) in total.extra.items()}
        return {**terms, "val_ar_loss": (total.ar_sum / total.ar_count.clamp_min(1)).item(),
                "val_diffusion_loss": (total.diffusion_sum / total.diffusion_count.clamp_min(1)).item(),
                "val_loss": (total.numerator(w) / total.denominator(w)).item(),
                **mask_rate_metrics(stats)}
