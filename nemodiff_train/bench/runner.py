"""``nemodiff-bench``: tokens/s of every decoding mode per batch size, against Hugging Face ``generate``.

Protocol (like Megatron-Bridge's ``benchmark_latency.py``): ``prompt_len`` = 128 prompt tokens,
``max_new_tokens`` = 128, ``warmups`` = 2 untimed calls per run, ``runs`` = 5 timed passes; the modes and
the baseline take turns batch by batch (:mod:`nemodiff_train.timing`), and every pass gives one tokens/s sample
(median, min, max in ``bench.json``). Every mode, the self-speculation ones included, decodes each batch
size of ``batch_sizes`` (default 1, 4, 16, 64; a batch size that runs out of device memory ends the sweep
and is reported as not fitting); ``crossover`` in ``bench.json`` is, per self-speculation mode, the first
batch size at which it no longer beats AR's tokens/s (:mod:`.report`). EOS is ignored by default (``use_eos=false``) so every run makes
exactly ``max_new_tokens`` per prompt.

Baseline: ``hf.generate`` greedy with ``min_new_tokens = max_new_tokens``, on CUDA with
``cache_implementation="static"`` (transformers compiles that forward), on a CPU with its default
dynamic cache.

Speed of light: the cost ``t(b, q)`` of one forward of q new tokens at batch b over a cache of
``prompt_len + max_new_tokens // 2`` columns (the middle of a decode) is measured for q = 1, B, B(B+1)
and every other query length the decoders used; each mode's forwards are counted by (b, q) in one
extra untimed pass (which also counts host syncs, :mod:`.syncs`: ``host_syncs_per_token``), and
``Σ count × t`` (prefill included) predicts its time and tokens/s. measured ÷
predicted < 1 is the overhead left on the table (sampling, host syncs, Python). The roofline floor
streams weights + KV bytes once per forward at ``hbm_tbps`` (H100/H200 defaults; none on a CPU).

Writes ``bench.json`` and ``bench.png`` (tokens/s per mode and batch, throughput against batch size,
forward cost by q) into ``out`` and prints a table.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..decoding import MODES, DecodeConfig, generate
from ..decoding.modes import REFERENCE_MODE
from ..models.dtypes import DTYPES
from .counting import ShapeCounter
from ..timing import TimedRun, run_interleaved, spread
from .report import crossovers, plot_report, print_report
from .shapes import GPU_ONLY_SHAPES, SHAPES, default_bandwidth, kv_bytes, random_model, weight_bytes
from .syncs import count_host_syncs

log = logging.getLogger(__name__)

__all__ = ["BenchConfig", "BenchError", "run_bench", "ShapeCounter"]

HF_RUN = "hf_generate"


class BenchError(ValueError):
    """A bad ``nemodiff-bench`` setting; the message names the key."""


@dataclass
class BenchConfig:
    """Everything ``nemodiff-bench`` accepts (conf/apps/bench.yaml; unknown keys fail)."""

    model: str | None = None
    """HF model directory, adapter export, training run directory (``hf/`` inside) or ``embedded`` (the demo
    base model)."""
    shape: str | None = None
    """Instead of ``model``: a random model of a named shape (qwen3-8b, qwen3-1.7b, embedded)."""
    force: bool = False
    """Run a GPU-only shape (qwen3-8b) on a CPU anyway."""
    out: str = "bench"
    modes: list[str] = field(default_factory=lambda: list(MODES))
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    """Batch sizes of the sweep (every mode at each); a size that does not fit in device memory ends it."""
    prompt_len: int = 128
    """Length of the random prompts (ignored with ``task``)."""
    max_new_tokens: int = 128
    num_prompts: int = 1
    """Prompts per timed pass (at least the batch size is used)."""
    warmups: int = 2
    runs: int = 5
    task: str | None = None
    """Take prompts from a bundled task or ``.jsonl`` (needs a tokenizer) instead of random ids."""
    block_size: int | None = None
    """B; None = the model's inference block size (16 for a random shape)."""
    threshold: float = 0.9
    commit_rule: str = "confident"
    """Block diffusion's commit rule: confident, prefix or prefix_ar (docs/decoding.md, "Commit rule")."""
    dtype: str = "auto"
    """auto (bfloat16 on CUDA, float32 on a CPU), float32 or bfloat16."""
    device: str = "auto"
    cache: str = "auto"
    """static, dynamic, or auto (static on CUDA, dynamic on a CPU)."""
    cuda_graphs: bool = True
    """With the static cache on CUDA: replay forwards as CUDA graphs."""
    compile: bool = False
    """With the static cache: run the post-prefill forwards through torch.compile (with graphs: compiled,
    then captured). The warm-ups pay the compilation."""
    hf_baseline: bool = True
    use_eos: bool = False
    """Stop at the tokenizer's EOS (default off: every run makes max_new_tokens)."""
    hbm_tbps: float | None = None
    """HBM bandwidth for the roofline floor; None = the device's known figure (H100 3.35, H200 4.8)."""
    sol_repeats: int = 10
    """Timed calls per forward shape in the speed-of-light table."""
    threads: int | None = None
    """torch CPU threads (None = leave as is)."""
    seed: int = 0

    def __post_init__(self):
        if (self.model is None) == (self.shape is None):
            raise BenchError("give exactly one of model=<dir|embedded> or shape=<name>")
        if self.shape is not None and self.shape not in SHAPES:
            raise BenchError(f"shape={self.shape!r}: choose one of {sorted(SHAPES)}")
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes:
            raise BenchError(f"modes must be a non-empty subset of {sorted(MODES)}, got {list(self.modes)}")
        for key in ("prompt_len", "max_new_tokens", "num_prompts", "runs", "sol_repeats"):
            if getattr(self, key) < 1:
                raise BenchError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.warmups < 0:
            raise BenchError(f"warmups must be >= 0, got {self.warmups}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise BenchError(f"batch_sizes must be a non-empty list of positive ints, got {list(self.batch_sizes)}")
        if self.cache not in ("auto", "static", "dynamic"):
            raise BenchError(f"cache must be auto, static or dynamic, got {self.cache!r}")
        if self.dtype not in ("auto", *DTYPES):
            raise BenchError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.block_size is not None and self.block_size < 2:
            raise BenchError(f"block_size must be >= 2, got {self.block_size}")


@dataclass
class _Setup:
    hf: Any
    lm: Any
    tokenizer: Any
    mask_id: int
    block_size: int
    device: torch.device
    dtype: torch.dtype
    eos: tuple[int, ...]
    source: str


def _load(cfg: BenchConfig) -> _Setup:
    from ..models.loading import pick_device

    device = pick_device(cfg.device)
    if cfg.shape in GPU_ONLY_SHAPES and device.type != "cuda" and not cfg.force:
        raise BenchError(f"shape={cfg.shape} is a GPU benchmark ({SHAPES[cfg.shape]['num_hidden_layers']} layers, "
                         f"~16 GB of weights): on a CPU it takes minutes per token and says nothing; run it on a GPU, "
                         f"or pass force=true")
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if cfg.dtype == "auto" else DTYPES[cfg.dtype]
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # see models/loading.py: per-shape cuDNN graph builds
    if cfg.shape is not None:
        hf, mask_id = random_model(cfg.shape, dtype, device, cfg.seed)
        tokenizer, block, source, eos = None, cfg.block_size or 16, f"random {cfg.shape}", ()
    else:
        from ..assets.resolve import resolve_model_path
        from ..models.loading import load_dlm_for_decoding, resolve_model_dir
        from ..models.stop_tokens import stop_token_ids

        path = resolve_model_dir(resolve_model_path(cfg.model))
        dlm = load_dlm_for_decoding(path, dtype, device, "sdpa")  # a full or an adapter export
        hf, mask_id, tokenizer = dlm.hf, dlm.settings.mask_token_id, dlm.tokenizer
        block, source = cfg.block_size or dlm.settings.inference_block_size, str(path)
        eos = stop_token_ids(tokenizer, getattr(hf, "generation_config", None)) if tokenizer is not None else ()
    return _Setup(hf, None, tokenizer, mask_id, block, device, dtype, tuple(eos) if cfg.use_eos else (), source)


def _cached_lm(cfg: BenchConfig, setup: _Setup, prompts: list[list[int]]):
    """The decoders' model: static cache (wide enough for ``prompts``) on CUDA or when asked, else dynamic."""
    if cfg.cache == "static" or (cfg.cache == "auto" and setup.device.type == "cuda"):
        from ..models.static_cache import StaticCachedLM, required_capacity

        capacity = required_capacity(max(map(len, prompts)), cfg.max_new_tokens, setup.block_size, cfg.modes)
        return StaticCachedLM(setup.hf, mask_token_id=setup.mask_id, capacity=capacity,
                              cuda_graphs=cfg.cuda_graphs and setup.device.type == "cuda", compile=cfg.compile)
    if cfg.compile:
        raise BenchError(f"compile=true compiles the static cache's forwards; cache={cfg.cache} on "
                         f"{setup.device.type} is the dynamic cache (pass cache=static)")
    from ..models.cached import HFCachedLM

    return HFCachedLM(setup.hf, mask_token_id=setup.mask_id)


def _prompts(cfg: BenchConfig, setup: _Setup, n: int) -> list[list[int]]:
    if cfg.task is not None:
        if setup.tokenizer is None:
            raise BenchError("task= needs a model directory with a tokenizer (a random shape has none)")
        from ..tasks import get_task

        task = get_task(cfg.task, tokenizer=setup.tokenizer, limit=n, chat_template=None,
                        token_budget=cfg.max_new_tokens)
        prompts = [task.render(setup.tokenizer, s) for s in task.samples()]
        if len(prompts) < n:
            raise BenchError(f"task={cfg.task!r} has {len(prompts)} samples, the benchmark needs {n}")
        return prompts[:n]
    rng = random.Random(cfg.seed)
    vocab = int(setup.hf.get_output_embeddings().weight.shape[0])
    usable = [t for t in range(min(vocab, 32000)) if t != setup.mask_id and t not in setup.eos]
    return [[rng.choice(usable) for _ in range(cfg.prompt_len)] for _ in range(n)]


def _hf_generate(setup: _Setup, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy ``hf.generate`` of exactly ``max_new`` tokens (left padded); static compiled cache on CUDA."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=setup.device)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, device=setup.device)
        mask[r, width - len(p):] = 1
    kw = {"cache_implementation": "static"} if setup.device.type == "cuda" else {}
    with torch.inference_mode():
        out = setup.hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                                do_sample=False, pad_token_id=0, **kw)
    return [row[width:].tolist() for row in out]


def _tokens(result) -> list[int]:
    return list(result.tokens) if hasattr(result, "tokens") else list(result)


def _time_forward(lm, batch: int, ctx: int, q: int, prefill: bool, repeats: int, device: torch.device) -> float:
    """Median seconds of one forward of q tokens at ``batch`` over ``ctx`` cached columns (0 for a prefill)."""
    g = torch.Generator().manual_seed(q)
    ids = lambda n: torch.randint(4, 64, (batch, n), generator=g)  # noqa: E731 - any non-mask ids
    times = []
    cache = None
    for i in range(repeats + 2):  # two warm-ups (graph capture, kernel choice)
        if prefill or cache is None:
            cache = lm.new_cache(batch)
            if not prefill:
                lm.forward(cache, ids(ctx), torch.arange(ctx)[None].expand(batch, ctx),
                           torch.ones(batch, ctx, ctx, dtype=torch.bool).tril(), True)
        start = 0 if prefill else ctx
        pos = torch.arange(start, start + q)[None].expand(batch, q)
        mask = torch.ones(batch, q, start + q, dtype=torch.bool)
        if prefill:
            mask = mask.tril()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        lm.forward(cache, ids(q), pos, mask, prefill)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _row(name: str, batch: int, run: TimedRun, ar_tokens, counts: Counter | None) -> dict[str, Any]:
    tokens = sum(len(_tokens(r)) for r in run.results)
    tps = [tokens / s for s in run.seconds]
    row = {"mode": name, "batch_size": batch, "prompts": len(run.results), "generated_tokens": tokens,
           "tokens_per_s": spread(tps), "seconds": spread(run.seconds)}
    if name != HF_RUN:
        forwards = sum(r.stats.forwards for r in run.results)
        calls = sum(counts.values())  # model calls, prefill included (a batched call serves every row)
        # forwards: per-row counts summed (TPF = tokens / forwards is the per-row figure at any batch size)
        row.update(forwards=forwards, tpf=tokens / forwards if forwards else 0.0, model_calls=calls,
                   ms_per_forward=1e3 * statistics.median(run.seconds) / calls if calls else None,
                   forwards_by_q={f"{q}{' prefill' if pre else ''}": n for (b, q, pre), n in sorted(counts.items())})
        drafted = sum(r.stats.drafted for r in run.results)
        if drafted:
            row["acceptance"] = sum(r.stats.accepted for r in run.results) / drafted
        if ar_tokens is not None and name != "ar":
            row["same_as_ar"] = sum(_tokens(r) == a for r, a in zip(run.results, ar_tokens)) / len(ar_tokens)
    return row


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the benchmark; write ``bench.json`` and ``bench.png`` into ``cfg.out``; return the report."""
    import transformers

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    setup = _load(cfg)
    B = setup.block_size
    decode_cfg = DecodeConfig(max_new_tokens=cfg.max_new_tokens, block_size=B, threshold=cfg.threshold,
                              commit_rule=cfg.commit_rule, eos_token_ids=setup.eos, seed=cfg.seed)
    n_prompts = max(cfg.num_prompts, max(cfg.batch_sizes))
    prompts = _prompts(cfg, setup, n_prompts)
    setup.lm = _cached_lm(cfg, setup, prompts)
    ctx = (sum(map(len, prompts)) // len(prompts)) + cfg.max_new_tokens // 2
    elsize = torch.tensor([], dtype=setup.dtype).element_size()
    bandwidth = cfg.hbm_tbps or default_bandwidth(setup.device)
    wbytes = weight_bytes(setup.hf)
    rows, forward_cost = [], {}
    def write_report(complete: bool, not_fitting=()) -> dict[str, Any]:
        """bench.json (and the plot) from the rows so far: rewritten after every batch size, so a run cut
        short by a time limit still leaves the batch sizes it finished (``complete`` says whether all did)."""
        table = [{"batch_size": b, "q": q, "prefill": pre, "ms": 1e3 * t,
                  "vs_q1": t / forward_cost[(b, 1, False)] if (b, 1, False) in forward_cost else None,
                  "roofline_ms": 1e3 * (wbytes + kv_bytes(setup.hf.config, b, (0 if pre else ctx) + q, elsize))
                  / (bandwidth * 1e12) if bandwidth else None}
                 for (b, q, pre), t in sorted(forward_cost.items())]
        report = {
            "settings": asdict(cfg), "complete": complete, "model": setup.source, "block_size": B,
            "dtype": str(setup.dtype), "device": str(setup.device),
            "device_name": torch.cuda.get_device_name(setup.device) if setup.device.type == "cuda" else "cpu",
            "cpu_threads": torch.get_num_threads(), "lm": type(setup.lm).__name__,
            "cuda_graphs": bool(getattr(setup.lm, "cuda_graphs", False)),
            "compiled": bool(getattr(setup.lm, "compile", False)),
            "parameters": sum(p.numel() for p in setup.hf.parameters()), "weight_bytes": wbytes,
            "context_for_forward_cost": ctx, "hbm_tbps": bandwidth,
            "torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "results": rows, "forward_cost": table, "batch_sizes_not_fitting": list(not_fitting),
            "crossover": crossovers(rows),
        }
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(report, indent=2))
        if complete:
            plot_report(report, out / "bench.png")
        return report

    not_fitting = []
    for batch in sorted(set(cfg.batch_sizes)):
        try:
            rows += _bench_batch(cfg, setup, batch, prompts, decode_cfg, forward_cost, ctx, bandwidth, wbytes, elsize)
        except torch.cuda.OutOfMemoryError as e:  # "up to what fits": report it and end the sweep
            log.warning("batch %d does not fit in device memory (%s): the sweep ends here", batch, e)
            not_fitting = [b for b in sorted(set(cfg.batch_sizes)) if b >= batch]
            torch.cuda.empty_cache()
            break
        write_report(complete=False)
    report = write_report(complete=True, not_fitting=not_fitting)
    print_report(report)
    return report


def _bench_batch(cfg: BenchConfig, setup: _Setup, batch: int, prompts, decode_cfg: DecodeConfig,
                 forward_cost: dict, ctx: int, bandwidth, wbytes: int, elsize: int) -> list[dict[str, Any]]:
    """The rows of one batch size: every mode and the baseline timed interleaved, then the untimed counting
    pass (forwards by shape, host syncs) and the speed-of-light prediction. Fills ``forward_cost``."""
    B = setup.block_size
    modes = list(cfg.modes)
    if REFERENCE_MODE not in modes:
        modes = [REFERENCE_MODE] + modes  # the reference for same_as_ar, vs_ar and the crossover (always)
    # num_prompts per pass, rounded down to whole batches (at least one)
    group = prompts[:max(batch, (cfg.num_prompts // batch) * batch)]
    runs = [TimedRun(m, (lambda chunk, m=m: generate(setup.lm, chunk, m, decode_cfg)), batch) for m in modes]
    if cfg.hf_baseline:
        runs.append(TimedRun(HF_RUN, lambda chunk: _hf_generate(setup, chunk, cfg.max_new_tokens), batch))
    log.info("batch %d: %s over %d prompts, %d warm-ups + %d timed passes, interleaved", batch,
             [r.name for r in runs], len(group), cfg.warmups, cfg.runs)
    run_interleaved(runs, group, repeats=cfg.runs, warmups=cfg.warmups, device=setup.device)
    counts, syncs = {}, {}
    for m in modes:  # one untimed pass per mode: its forwards by (b, q) and its host syncs
        counter = ShapeCounter(setup.lm)
        with count_host_syncs() as seen:
            for i in range(0, len(group), batch):
                generate(counter, group[i:i + batch], m, decode_cfg)
        counts[m], syncs[m] = counter.counts, seen.count
    ar_tokens = next(([_tokens(r) for r in run.results] for run in runs if run.name == "ar"), None)
    shapes = {(b, q, pre) for c in counts.values() for (b, q, pre) in c}
    shapes |= {(batch, q, False) for q in (1, B, B * (B + 1))}
    for key in sorted(shapes):
        b, q, pre = key
        if key not in forward_cost and (pre or ctx + q <= getattr(setup.lm, "capacity", 1 << 30)):
            forward_cost[key] = _time_forward(setup.lm, b, ctx, q, pre, cfg.sol_repeats, setup.device)
    rows = []
    for run in runs:
        row = _row(run.name, batch, run, ar_tokens, counts.get(run.name))
        if run.name in counts:
            c = counts[run.name]
            row["host_syncs_per_token"] = syncs[run.name] / row["generated_tokens"] if row["generated_tokens"] else None
            predicted = sum(n * forward_cost[k] for k, n in c.items() if k in forward_cost)
            row["predicted_tokens_per_s"] = row["generated_tokens"] / predicted if predicted else None
            if row["predicted_tokens_per_s"]:
                row["measured_over_predicted"] = row["tokens_per_s"]["median"] / row["predicted_tokens_per_s"]
            if bandwidth:
                floor = sum(n * (wbytes + kv_bytes(setup.hf.config, b, (0 if pre else ctx) + q, elsize))
                            for (b, q, pre), n in c.items()) / (bandwidth * 1e12)
                row["roofline_tokens_per_s"] = row["generated_tokens"] / floor
        rows.append(row)
    ar_tps = next(r["tokens_per_s"]["median"] for r in rows if r["mode"] == "ar")
    for r in rows:
        r["vs_ar"] = r["tokens_per_s"]["median"] / ar_tps
    return rows
