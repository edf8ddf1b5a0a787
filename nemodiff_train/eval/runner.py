"""The evaluator: decode a task in every requested mode, measure speed and accuracy, write the report.

For each mode it decodes all samples, timing only the decoding (after one warm-up call), and
reports tokens per forward (TPF, the prefill forward excluded), tokens/s, the task's accuracy
metrics and, for the self-speculation modes, ``lossless`` = the fraction of samples whose output
equals AR greedy output token for token. Writes ``eval.json``, ``samples.jsonl`` and
``tpf_accuracy.png`` into ``out`` and prints a table (DESIGN.md, "nemodiff-eval writes").

Run (CPU, the embedded model)::

    nemodiff-eval model=<hf dir or run dir> modes=[ar,diffusion,linear_spec,quadratic_spec] out=/tmp/eval limit=8
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..decoding import BATCHED_MODES, generate
from ..decoding.config import DecodeConfig
from .loading import DTYPES, load_for_eval
from .report import print_table, write_outputs
from .tasks import Task, get_task

log = logging.getLogger(__name__)

__all__ = ["EvalConfig", "run_evaluation", "ALL_MODES", "SPEC_MODES"]

ALL_MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")
SPEC_MODES = ("linear_spec", "quadratic_spec")
# Self-speculation decoders are batch 1 (ALGORITHMS.md §5.16): only BATCHED_MODES get batch_size prompts per call.


@dataclass
class EvalConfig:
    """Everything ``nemodiff-eval`` accepts (the Hydra config is merged into this; unknown keys fail)."""

    model: str
    """HF model directory, or a training run directory holding the export in ``hf/``."""
    out: str
    """Output directory (created)."""
    modes: list[str] = field(default_factory=lambda: list(ALL_MODES))
    task: str = "code_completion"
    """A bundled task name or a path to a ``.jsonl`` file with ``prompt``/``reference`` fields."""
    limit: int | None = None
    """Evaluate only the first ``limit`` samples."""
    max_new_tokens: int = 64
    block_size: int | None = None
    """Decoding block size; None = the model's ``inference_block_size``."""
    threshold: float = 0.9
    """Diffusion confidence threshold τ (also the drafts' threshold where a decoder uses one)."""
    temperature: float = 0.0
    batch_size: int = 1
    """Prompts per decoder call in ar/diffusion mode (self-speculation is always batch 1)."""
    tau_sweep: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9, 0.95])
    """Re-run diffusion mode at each τ for the TPF-accuracy plot; empty = off."""
    chat_template: bool | None = None
    """Render prompts with the tokenizer's chat template; None = when it has one."""
    dtype: str = "float32"
    device: str = "auto"
    seed: int = 0

    def __post_init__(self):
        unknown = [m for m in self.modes if m not in ALL_MODES]
        if unknown or not self.modes:
            raise ValueError(f"modes must be a non-empty subset of {list(ALL_MODES)}, got {list(self.modes)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {self.limit}")


@dataclass
class ModeRun:
    """Raw outcome of decoding every sample once in one mode."""

    mode: str
    threshold: float
    results: list  # list[DecodeResult], one per sample
    seconds: float

    @property
    def generated_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.results)

    @property
    def forwards(self) -> int:
        return sum(r.stats.forwards for r in self.results)

    @property
    def prefill_forwards(self) -> int:
        return sum(r.stats.prefill_forwards for r in self.results)


class Evaluator:
    """Holds the loaded model, the task and the rendered prompts for one evaluation."""

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.dlm, self.lm, self.eos_ids, self.hf_dir = load_for_eval(cfg.model, cfg.dtype, cfg.device)
        self.tokenizer = self.dlm.tokenizer
        self.task: Task = get_task(cfg.task, tokenizer=self.tokenizer, limit=cfg.limit,
                                   chat_template=cfg.chat_template, token_budget=cfg.max_new_tokens)
        self.samples = self.task.samples()
        if not self.samples:
            raise ValueError(f"task {cfg.task!r} has no samples")
        self.prompts = [self.task.render(self.tokenizer, s) for s in self.samples]
        self.block_size = cfg.block_size or self.dlm.settings.inference_block_size
        self.decode_cfg = DecodeConfig(max_new_tokens=cfg.max_new_tokens, block_size=self.block_size,
                                       threshold=cfg.threshold, temperature=cfg.temperature,
                                       eos_token_ids=self.eos_ids, seed=cfg.seed)

    def _sync(self) -> None:
        if self.lm.device.type == "cuda":
            torch.cuda.synchronize(self.lm.device)

    def decode(self, mode: str, threshold: float | None = None) -> ModeRun:
        """Decode every sample in ``mode``; the clock covers decoder calls only."""
        dcfg = self.decode_cfg if threshold is None else replace(self.decode_cfg, threshold=threshold)
        step = self.cfg.batch_size if mode in BATCHED_MODES else 1
        # Warm-up: one short call at the real batch size, so lazy initialisation (kernels picked per
        # shape and dtype, allocator growth) is not timed.
        generate(self.lm, self.prompts[:step], mode, replace(dcfg, max_new_tokens=2))
        results, seconds = [], 0.0
        for start in range(0, len(self.prompts), step):
            chunk = self.prompts[start:start + step]
            self._sync()
            t0 = time.perf_counter()
            results.extend(generate(self.lm, chunk, mode, dcfg))
            self._sync()
            seconds += time.perf_counter() - t0
        return ModeRun(mode, dcfg.threshold, results, seconds)

    def text(self, tokens: list[int]) -> str:
        """Output text for scoring: EOS and other special tokens removed."""
        return self.tokenizer.decode([t for t in tokens if t not in self.eos_ids], skip_special_tokens=True)

    def score(self, run: ModeRun) -> tuple[dict[str, float], list[dict[str, float]]]:
        """(mean metrics, per-sample metrics) of one mode run."""
        per_sample = [self.task.score(s, self.text(r.tokens)) for s, r in zip(self.samples, run.results)]
        names = self.task.metric_names
        means = {k: sum(m[k] for m in per_sample) / len(per_sample) for k in names}
        return means, per_sample

    def summary(self, run: ModeRun, metrics: dict[str, float], requested: bool) -> dict[str, Any]:
        """One ``eval.json`` row."""
        import transformers

        gen, fwd = run.generated_tokens, run.forwards
        return {
            "mode": run.mode, "task": self.task.name, "samples": len(run.results),
            "generated_tokens": gen, "forwards": fwd, "prefill_forwards": run.prefill_forwards,
            # TPF excludes prefill forwards (ALGORITHMS.md §3.6/§5.13); the prefill-inclusive figure sits beside it.
            "tpf": gen / fwd if fwd else 0.0,
            "tpf_incl_prefill": gen / (fwd + run.prefill_forwards) if fwd + run.prefill_forwards else 0.0,
            "tokens_per_s": gen / run.seconds if run.seconds > 0 else 0.0,
            "decode_seconds": run.seconds,
            **metrics,
            "metric_names": list(self.task.metric_names), "primary_metric": self.task.primary_metric,
            "requested": requested,
            "block_size": self.block_size, "threshold": run.threshold, "temperature": self.cfg.temperature,
            "max_new_tokens": self.cfg.max_new_tokens,
            "batch_size": self.cfg.batch_size if run.mode in BATCHED_MODES else 1,
            "dtype": self.cfg.dtype, "device": str(self.lm.device),
            "torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "model": str(self.hf_dir), "seed": self.cfg.seed,
        }

    def sample_rows(self, run: ModeRun, per_sample: list[dict[str, float]]) -> list[dict[str, Any]]:
        """``samples.jsonl`` rows of one mode run."""
        return [{"mode": run.mode, "index": i, "prompt_ids": p, "output_ids": list(r.tokens),
                 "forwards": r.stats.forwards, "prefill_forwards": r.stats.prefill_forwards,
                 "finished_by": r.stats.finished_by, "output_text": self.text(r.tokens), "metrics": m}
                for i, (p, r, m) in enumerate(zip(self.prompts, run.results, per_sample))]


def _modes_to_run(modes: list[str]) -> tuple[list[str], bool]:
    """Run order (ar first) and whether ar was added only as the lossless reference."""
    ordered = [m for m in ALL_MODES if m in modes]
    extra_ar = "ar" not in ordered and any(m in SPEC_MODES for m in ordered)
    return (["ar"] + ordered if extra_ar else ordered), extra_ar


def run_evaluation(cfg: EvalConfig) -> list[dict[str, Any]]:
    """Evaluate ``cfg.model`` on ``cfg.task`` in ``cfg.modes``; write the report into ``cfg.out``.

    Returns:
        The ``eval.json`` rows (one per mode run, ``ar`` included whenever a self-speculation mode
        was asked for; it then has ``requested: false`` if it was not asked for itself).
    """
    ev = Evaluator(cfg)
    modes, extra_ar = _modes_to_run(list(cfg.modes))
    if extra_ar:
        log.info("running ar as well (not in modes): it is the reference for the self-speculation 'lossless' metric")
    if cfg.batch_size > 1 and any(m in SPEC_MODES for m in modes):
        log.warning("batch_size=%d: ar runs batched while self-speculation runs batch 1; padding can change "
                    "floating-point results, so 'lossless' is exact only with batch_size=1", cfg.batch_size)
    log.info("task %s: %d samples, block %d, tau %.2f, max_new_tokens %d", ev.task.name, len(ev.samples),
             ev.block_size, cfg.threshold, cfg.max_new_tokens)
    rows, sample_rows, ar_tokens = [], [], None
    for mode in modes:
        run = ev.decode(mode)
        metrics, per_sample = ev.score(run)
        row = ev.summary(run, metrics, requested=mode in cfg.modes)
        if mode == "ar":
            ar_tokens = [list(r.tokens) for r in run.results]
        if mode in SPEC_MODES:
            same = [list(r.tokens) == ref for r, ref in zip(run.results, ar_tokens)]
            row["lossless"] = sum(same) / len(same)
        if mode == "diffusion":
            row["tau_sweep"] = _tau_sweep(ev, cfg, row)
        log.info("%s: tpf %.2f, %.1f tok/s, %s", mode, row["tpf"], row["tokens_per_s"],
                 ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        rows.append(row)
        sample_rows.extend(ev.sample_rows(run, per_sample))
    write_outputs(Path(cfg.out), rows, sample_rows, config=asdict(cfg))
    print_table(rows)
    return rows


def _tau_sweep(ev: Evaluator, cfg: EvalConfig, main_row: dict[str, Any]) -> list[dict[str, Any]]:
    """Diffusion mode at each τ of ``cfg.tau_sweep`` (the main run is reused at its own τ)."""
    points = []
    for tau in sorted(set(cfg.tau_sweep)):
        if abs(tau - cfg.threshold) < 1e-9:
            metrics = {k: main_row[k] for k in ev.task.metric_names}
            tpf, tps = main_row["tpf"], main_row["tokens_per_s"]
        else:
            run = ev.decode("diffusion", threshold=tau)
            metrics, _ = ev.score(run)
            tpf = run.generated_tokens / run.forwards if run.forwards else 0.0
            tps = run.generated_tokens / run.seconds if run.seconds > 0 else 0.0
        points.append({"threshold": tau, "tpf": tpf, "tokens_per_s": tps, **metrics})
    return points
