"""The evaluator: decode tasks in every requested mode, measure speed and accuracy, write the report.

For each task it decodes all samples in every run (a requested mode at the main setting, or a sweep
point: diffusion at another τ, a self-speculation mode at another block size). The runs are
**interleaved**: for every chunk of prompts each run decodes it in turn, so a load change on a shared
machine hits every mode alike and the ``tokens/s ÷ ar`` ratios stay meaningful. Only decoder calls are
timed, after one warm-up call per run. Each row reports tokens per forward (TPF, the prefill forward
excluded), tokens/s, the task's accuracy metrics and, for the self-speculation modes, ``lossless`` =
the fraction of samples whose output equals AR greedy output token for token. Writes ``eval.json``,
``samples.jsonl`` and ``tpf_accuracy.png`` into ``out`` and prints a table (README.md, "Run directory").

Run (CPU, the embedded model)::

    nemodiff-eval model=<hf dir or run dir> task=[arithmetic,code_completion] out=/tmp/eval limit=8 \\
        sweep.threshold=[0.5,0.7,0.9] sweep.block_size=[4,8,16]
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..config.schema import EvalSweepConfig as SweepConfig  # one definition for nemodiff-eval and eval.sweep
from ..config.validate import limit_problem
from ..timing import TimedRun, run_interleaved
from ..decoding import generate
from ..decoding.config import COMMIT_RULES, DecodeConfig
from ..decoding.modes import ALL_MODES, SPECULATIVE_MODES, with_reference
from .intervals import metric_intervals
from ..models.dtypes import DTYPES
from ..models.loading import load_for_decoding
from .report import print_table, write_outputs
from ..tasks import Task, get_task

log = logging.getLogger(__name__)

__all__ = ["EvalConfig", "SweepConfig", "HeadroomConfig", "run_evaluation"]



@dataclass
class HeadroomConfig:
    """Settings of ``analysis=headroom`` (:mod:`nemodiff_train.eval.headroom`)."""

    stride: int = 3
    """Distance between block starts inside a reference."""
    max_ref_tokens: int = 40
    """Reference tokens scored per row."""


@dataclass
class EvalConfig:
    """Everything ``nemodiff-eval`` accepts (the Hydra config is merged into this; unknown keys fail)."""

    model: str
    """HF model directory, or a training run directory holding the export in ``hf/``."""
    out: str
    """Output directory (created)."""
    analysis: str = "decode"
    """``decode`` (every mode, TPF, tokens/s, accuracy) or ``headroom`` (teacher-forced confidence of
    the diffusion view per block offset: why TPF is what it is)."""
    modes: list[str] = field(default_factory=lambda: list(ALL_MODES))
    task: Any = "code_completion"
    """A bundled task name or a path to a ``.jsonl`` file with ``prompt``/``reference`` fields, or a list of them."""
    limit: Any = None
    """Evaluate only the first ``limit`` samples of each task; a mapping ``{task: n}`` limits the tasks
    it names (the others run every sample), so a slow task with no headroom can run fewer rows."""
    max_new_tokens: int = 64
    block_size: int | None = None
    """Decoding block size; None = the model's ``inference_block_size``."""
    threshold: float = 0.9
    """Diffusion confidence threshold τ (also the drafts' threshold where a decoder uses one)."""
    commit_rule: str = "confident"
    """Block diffusion's commit rule: ``confident`` (the method's: every position ≥ τ), ``prefix`` (the
    leftmost run of them: a block fills left to right) or ``prefix_ar`` (and a block ends where no mask
    reaches τ, the AR view giving the next token; docs/decoding.md, "Commit rule")."""
    temperature: float = 0.0
    batch_size: int = 1
    """Prompts per decoder call, in every mode (row i of a batch decodes as prompt i alone; samples.jsonl
    keeps each sample's own ``forwards``)."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    headroom: HeadroomConfig = field(default_factory=HeadroomConfig)
    chat_template: bool | None = None
    """Render prompts with the tokenizer's chat template; None = when it has one."""
    dtype: str = "float32"
    device: str = "auto"
    static_cache: bool = True
    """On CUDA, decode through the static-shape cache (models/static_cache.py); false = the dynamic one."""
    cuda_graphs: bool = True
    """With the static cache on CUDA, replay each decoding forward as a CUDA graph."""
    compile: bool = False
    """With the static cache on CUDA, run the decoding forwards through torch.compile (then captured)."""
    seed: int = 0
    base_model: str | None = None
    """An untouched AR base (HF directory or Hub id resolved by the caller) decoded in AR mode on the same
    rows, interleaved with the other runs: its row (``mode: base``) puts the conversion's cost in
    accuracy beside every mode. None = no base row."""

    def __post_init__(self):
        if self.analysis not in ("decode", "headroom"):
            raise ValueError(f"analysis must be decode or headroom, got {self.analysis!r}")
        unknown = [m for m in self.modes if m not in ALL_MODES]
        if unknown or not self.modes:
            raise ValueError(f"modes must be a non-empty subset of {list(ALL_MODES)}, got {list(self.modes)}")
        rules = [("commit_rule", self.commit_rule)] + [("sweep.commit_rule", r) for r in self.sweep.commit_rule]
        for key, rule in rules:
            if rule not in COMMIT_RULES:
                raise ValueError(f"{key} must be one of {list(COMMIT_RULES)}, got {rule!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        tasks = self.tasks
        if not tasks or not all(isinstance(t, str) and t for t in tasks):
            raise ValueError(f"task must be a task name / .jsonl path or a non-empty list of them, got {self.task!r}")
        problem = limit_problem(self.limit, tasks)
        if problem:
            raise ValueError(f"limit {problem}")
        if any(not 0.0 < t <= 1.0 for t in self.sweep.threshold):
            raise ValueError(f"sweep.threshold values must be in (0, 1], got {list(self.sweep.threshold)}")
        if any(b < 1 for b in self.sweep.block_size):
            raise ValueError(f"sweep.block_size values must be >= 1, got {list(self.sweep.block_size)}")
        if self.compile and not self.static_cache:
            raise ValueError("compile=true compiles the static cache's forwards: it needs static_cache=true")
        if self.compile and self.device == "cpu":
            raise ValueError("compile=true applies to the static cache on CUDA; device=cpu decodes with the dynamic cache")
        stray = [t for t in self.sweep.tasks if t not in tasks]
        if stray:
            raise ValueError(f"sweep.tasks names {stray}, which are not among the evaluated tasks {tasks}")

    @property
    def tasks(self) -> list[str]:
        """``task`` as a list (one name or path, or several)."""
        return [self.task] if isinstance(self.task, str) else list(self.task)

    def limit_of(self, task: str) -> int | None:
        """The row limit of ``task`` (None = every sample)."""
        return self.limit.get(task) if isinstance(self.limit, Mapping) else self.limit


@dataclass(frozen=True)
class RunSpec:
    """One decoding setting to run over every sample: a mode at the main setting or a sweep point."""

    mode: str
    cfg: DecodeConfig
    sweep: str | None = None  # None (a requested mode), "threshold" or "block_size"
    base: bool = False  # decode with the untouched base (EvalConfig.base_model), not the converted model

    @property
    def label(self) -> str:
        """The ``mode`` of its ``eval.json`` row: the decoder's name, or ``base`` for the base's AR run."""
        return "base" if self.base else self.mode


@dataclass
class ModeRun:
    """Raw outcome of decoding every sample once with one :class:`RunSpec`."""

    spec: RunSpec
    results: list = field(default_factory=list)  # list[DecodeResult], one per sample
    seconds: float = 0.0

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
    """Holds the loaded model and decodes, scores and summarises one task at a time."""

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.dlm, self.lm, self.eos_ids, self.hf_dir = load_for_decoding(cfg.model, cfg.dtype, cfg.device)
        self.base_lm = load_for_decoding(cfg.base_model, cfg.dtype, cfg.device)[1] if cfg.base_model else None
        self.tokenizer = self.dlm.tokenizer
        self.block_size = cfg.block_size or self.dlm.settings.inference_block_size
        self.decode_cfg = DecodeConfig(max_new_tokens=cfg.max_new_tokens, block_size=self.block_size,
                                       threshold=cfg.threshold, commit_rule=cfg.commit_rule,
                                       temperature=cfg.temperature,
                                       eos_token_ids=self.eos_ids, seed=cfg.seed)

    def load_task(self, name: str) -> tuple[Task, list[list[int]]]:
        """The task and its rendered prompt ids."""
        task = get_task(name, tokenizer=self.tokenizer, limit=self.cfg.limit_of(name),
                        chat_template=self.cfg.chat_template, token_budget=self.cfg.max_new_tokens)
        if not task.samples():
            raise ValueError(f"task {name!r} has no samples")
        # A reference longer than the generation budget cannot be matched in full: say so, since
        # answer-at-the-end metrics (arithmetic's exact match) would silently read 0 on those rows.
        long_refs = task.scores_the_end and sum(
            len(self.tokenizer.encode(s.reference, add_special_tokens=False)) >= self.cfg.max_new_tokens
            for s in task.samples())
        if long_refs:
            log.warning("task %s: %d of %d references have >= max_new_tokens=%d tokens; their outputs are cut "
                        "before the reference ends and its answer is lost (raise max_new_tokens)",
                        name, long_refs, len(task.samples()), self.cfg.max_new_tokens)
        return task, [task.render(self.tokenizer, s) for s in task.samples()]

    def run_specs(self, modes: list[str], task: str | None = None) -> list[RunSpec]:
        """The main runs (``modes`` in order) followed by the sweep points not equal to a main run
        (none for a ``task`` outside a non-empty ``sweep.tasks``)."""
        specs = [RunSpec(m, self.decode_cfg) for m in modes]
        if self.base_lm is not None:
            specs.append(RunSpec("ar", self.decode_cfg, base=True))
        if task is not None and self.cfg.sweep.tasks and task not in self.cfg.sweep.tasks:
            return specs
        if "diffusion" in modes:
            specs += [RunSpec("diffusion", replace(self.decode_cfg, threshold=t), "threshold")
                      for t in sorted(set(self.cfg.sweep.threshold)) if abs(t - self.cfg.threshold) > 1e-9]
            specs += [RunSpec("diffusion", replace(self.decode_cfg, commit_rule=r), "commit_rule")
                      for r in dict.fromkeys(self.cfg.sweep.commit_rule) if r != self.cfg.commit_rule]
        for mode in (m for m in SPECULATIVE_MODES if m in modes):
            specs += [RunSpec(mode, replace(self.decode_cfg, block_size=b), "block_size")
                      for b in sorted(set(self.cfg.sweep.block_size)) if b != self.block_size]
        return specs

    def use_static_cache(self, prompts: list[list[int]], specs: list[RunSpec]) -> None:
        """On CUDA (unless ``static_cache=false``): decode through a :class:`StaticCachedLM` wide enough for
        ``prompts`` and every spec (kept across tasks while wide enough, so its CUDA graphs are reused)."""
        if self.lm.device.type != "cuda" or not self.cfg.static_cache:
            if self.cfg.compile:
                raise ValueError(f"compile=true compiles the static cache's forwards, which run on CUDA with "
                                 f"static_cache=true (here: device {self.lm.device.type}, static_cache="
                                 f"{str(self.cfg.static_cache).lower()})")
            return
        from ..models.static_cache import StaticCachedLM, required_capacity

        need = max(required_capacity(max(map(len, prompts)), s.cfg.max_new_tokens, s.cfg.block_size, [s.mode])
                   for s in specs)
        if getattr(self.lm, "capacity", 0) < need:
            self.lm = StaticCachedLM(self.dlm, capacity=need, cuda_graphs=self.cfg.cuda_graphs, compile=self.cfg.compile)
            log.info("static KV cache: %d columns per row, CUDA graphs %s, compiled %s", need,
                     "on" if self.cfg.cuda_graphs else "off", "yes" if self.cfg.compile else "no")

    def decode_interleaved(self, specs: list[RunSpec], prompts: list[list[int]]) -> list[ModeRun]:
        """Decode every prompt with every spec, spec after spec per chunk of prompts; time decoder calls only
        (:func:`nemodiff_train.timing.run_interleaved`, the protocol ``nemodiff-bench`` uses)."""
        self.use_static_cache(prompts, specs)
        lm_of = lambda s: self.base_lm if s.base else self.lm  # noqa: E731
        timed = [TimedRun(str(i), (lambda chunk, s=s: generate(lm_of(s), chunk, s.mode, s.cfg)), self.cfg.batch_size)
                 for i, s in enumerate(specs)]
        # warm-up: lazy initialisation (kernels per shape, allocator growth) is not timed
        run_interleaved(timed, prompts, repeats=1, warmups=1, device=self.lm.device,
                        warmup=lambda r: generate(lm_of(specs[int(r.name)]), prompts[:r.chunk], specs[int(r.name)].mode,
                                                  replace(specs[int(r.name)].cfg, max_new_tokens=2)))
        return [ModeRun(s, t.results, t.seconds[0]) for s, t in zip(specs, timed)]

    def text(self, tokens: list[int]) -> str:
        """Output text for scoring: EOS and other special tokens removed."""
        return self.tokenizer.decode([t for t in tokens if t not in self.eos_ids], skip_special_tokens=True)

    def score(self, task: Task, run: ModeRun) -> tuple[dict[str, float], list[dict[str, float]]]:
        """(mean metrics, per-sample metrics) of one run."""
        per_sample = [task.score(s, self.text(r.tokens)) for s, r in zip(task.samples(), run.results)]
        means = {k: sum(m[k] for m in per_sample) / len(per_sample) for k in task.metric_names}
        return means, per_sample

    def summary(self, task: Task, run: ModeRun, metrics: dict[str, float], requested: bool) -> dict[str, Any]:
        """One ``eval.json`` row."""
        import transformers

        gen, fwd, spec = run.generated_tokens, run.forwards, run.spec
        return {
            "mode": spec.label, "task": task.name, "sweep": spec.sweep, "samples": len(run.results),
            "generated_tokens": gen, "forwards": fwd, "prefill_forwards": run.prefill_forwards,
            # TPF excludes prefill forwards (docs/method.md); the prefill-inclusive figure sits beside it.
            "tpf": gen / fwd if fwd else 0.0,
            "tpf_incl_prefill": gen / (fwd + run.prefill_forwards) if fwd + run.prefill_forwards else 0.0,
            "tokens_per_s": gen / run.seconds if run.seconds > 0 else 0.0,
            "decode_seconds": run.seconds,
            **metrics,
            "metric_names": list(task.metric_names), "primary_metric": task.primary_metric,
            "requested": requested,
            "block_size": spec.cfg.block_size, "threshold": spec.cfg.threshold,
            "commit_rule": spec.cfg.commit_rule, "temperature": self.cfg.temperature,
            "max_new_tokens": self.cfg.max_new_tokens,
            "batch_size": self.cfg.batch_size,
            "dtype": self.cfg.dtype, "device": str(self.lm.device),
            "torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "model": str(self.cfg.base_model if spec.base else self.hf_dir), "seed": self.cfg.seed,
        }

    def sample_rows(self, task: Task, prompts: list[list[int]], run: ModeRun,
                    per_sample: list[dict[str, float]]) -> list[dict[str, Any]]:
        """``samples.jsonl`` rows of one run."""
        return [{"task": task.name, "mode": run.spec.label, "index": i, "prompt_ids": p, "output_ids": list(r.tokens),
                 "forwards": r.stats.forwards, "prefill_forwards": r.stats.prefill_forwards,
                 "finished_by": r.stats.finished_by, "output_text": self.text(r.tokens), "metrics": m}
                for i, (p, r, m) in enumerate(zip(prompts, run.results, per_sample))]


def evaluate_task(ev: Evaluator, name: str, modes: list[str]) -> tuple[list[dict], list[dict]]:
    """(eval.json rows, samples.jsonl rows) of one task: every mode and sweep point, interleaved."""
    cfg = ev.cfg
    task, prompts = ev.load_task(name)
    specs = ev.run_specs(modes, name)
    log.info("task %s: %d samples, block %d, tau %.2f, max_new_tokens %d, %d runs interleaved", task.name,
             len(prompts), ev.block_size, cfg.threshold, cfg.max_new_tokens, len(specs))
    runs = ev.decode_interleaved(specs, prompts)
    ar_tokens = next(([list(r.tokens) for r in run.results] for run in runs if run.spec.label == "ar"), None)
    rows, sample_rows = [], []
    for run in runs:
        metrics, per_sample = ev.score(task, run)
        row = ev.summary(task, run, metrics, requested=run.spec.mode in cfg.modes and run.spec.sweep is None)
        row.update(metric_intervals(per_sample, task.metric_names))
        if run.spec.mode in SPECULATIVE_MODES:
            same = [list(r.tokens) == ref for r, ref in zip(run.results, ar_tokens)]
            row["lossless"] = sum(same) / len(same)
        rows.append(row)
        if run.spec.sweep is None:
            sample_rows.extend(ev.sample_rows(task, prompts, run, per_sample))
            log.info("%s %s: tpf %.2f, %.1f tok/s, %s", task.name, run.spec.label, row["tpf"], row["tokens_per_s"],
                     ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return rows, sample_rows


def run_evaluation(cfg: EvalConfig) -> list[dict[str, Any]]:
    """Evaluate ``cfg.model`` on every task of ``cfg.task`` in ``cfg.modes``; write the report into ``cfg.out``.

    Returns:
        The ``eval.json`` rows: per task, one per mode (``ar`` included whenever a self-speculation
        mode was asked for; it then has ``requested: false``), then one per sweep point (``sweep`` names
        the swept setting; main rows have ``sweep: null``).
    """
    if cfg.analysis == "headroom":
        from .headroom import run_headroom

        return run_headroom(cfg)
    ev = Evaluator(cfg)
    modes, extra_ar = with_reference(list(cfg.modes))
    if extra_ar:
        log.info("running ar as well (not in modes): it is the reference for the self-speculation 'lossless' metric")
    rows, sample_rows = [], []
    for name in cfg.tasks:
        task_rows, task_samples = evaluate_task(ev, name, modes)
        rows += task_rows
        sample_rows += task_samples
    write_outputs(Path(cfg.out), rows, sample_rows, config=asdict(cfg))
    print_table(rows)
    return rows
