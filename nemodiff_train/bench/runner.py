"""``nemodiff-bench``: tokens/s of every decoding mode per batch size, against Hugging Face ``generate``.

Protocol (like Megatron-Bridge's ``benchmark_latency.py``): ``prompt_len`` = 128 prompt tokens,
``max_new_tokens`` = 128, ``warmups`` = 2 untimed calls per run, ``runs`` = 5 timed passes; the modes and
the baseline take turns prompt by prompt (:mod:`.protocol`), and every pass gives one tokens/s sample
(median, min, max in ``bench.json``). EOS is ignored by default (``use_eos=false``) so every run makes
exactly ``max_new_tokens`` per prompt.

Baseline: ``hf.generate`` greedy with ``min_new_tokens = max_new_tokens``, on CUDA with
``cache_implementation="static"`` (transformers compiles that forward), on a CPU with its default
dynamic cache.

Speed of light: the cost ``t(b, q)`` of one forward of q new tokens at batch b over a cache of
``prompt_len + max_new_tokens // 2`` columns (the middle of a decode) is measured for q = 1, B, B(B+1)
and every other query length the decoders used; each mode's forwards are counted by (b, q) in one
extra untimed pass, and ``Σ count × t`` (prefill included) predicts its time and tokens/s. measured ÷
predicted < 1 is the overhead left on the table (sampling, host syncs, Python). The roofline floor
streams weights + KV bytes once per forward at ``hbm_tbps`` (H100/H200 defaults; none on a CPU).

Writes ``bench.json`` and ``bench.png`` into ``out`` and prints a table.
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

from ..decoding import BATCHED_MODES, MODES, DecodeConfig, generate
from .protocol import TimedRun, run_interleaved, spread
from .shapes import GPU_ONLY_SHAPES, SHAPES, default_bandwidth, kv_bytes, random_model, weight_bytes

log = logging.getLogger(__name__)

__all__ = ["BenchConfig", "BenchError", "run_bench", "ShapeCounter"]

HF_RUN = "hf_generate"


class BenchError(ValueError):
    """A bad ``nemodiff-bench`` setting; the message names the key."""


@dataclass
class BenchConfig:
    """Everything ``nemodiff-bench`` accepts (conf/apps/bench.yaml; unknown keys fail)."""

    model: str | None = None
    """HF model directory, training run directory (``hf/`` inside) or ``embedded`` (the demo base model)."""
    shape: str | None = None
    """Instead of ``model``: a random model of a named shape (qwen3-8b, qwen3-1.7b, embedded)."""
    force: bool = False
    """Run a GPU-only shape (qwen3-8b) on a CPU anyway."""
    out: str = "bench"
    modes: list[str] = field(default_factory=lambda: list(MODES))
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    """Batch sizes; self-speculation (batch 1 by design) runs only at 1."""
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
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise BenchError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.block_size is not None and self.block_size < 2:
            raise BenchError(f"block_size must be >= 2, got {self.block_size}")


class ShapeCounter:
    """A :class:`CachedLM` wrapper that counts forwards by ``(batch, q, prefill)`` (prefill = empty cache)."""

    def __init__(self, lm):
        self.lm, self.counts = lm, Counter()
        self.mask_token_id, self.vocab_size = lm.mask_token_id, lm.vocab_size
        self.device = lm.device

    def new_cache(self, batch_size):
        return self.lm.new_cache(batch_size)

    def cache_length(self, cache):
        return self.lm.cache_length(cache)

    @property
    def has_adapter(self) -> bool:
        return bool(getattr(self.lm, "has_adapter", False))

    def forward(self, cache, input_ids, position_ids, attention_mask, write_cache, **kwargs):
        b, q = input_ids.shape
        self.counts[(b, q, self.lm.cache_length(cache) == 0)] += 1
        # kwargs: the drafter adapter's per-token gate, passed through so the counted pass is the real one
        return self.lm.forward(cache, input_ids, position_ids, attention_mask, write_cache, **kwargs)

    def keep_cache(self, cache, positions):
        return self.lm.keep_cache(cache, positions)

    def cache_tensors(self, cache):
        return self.lm.cache_tensors(cache)


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
    from ..eval.loading import pick_device

    device = pick_device(cfg.device)
    if cfg.shape in GPU_ONLY_SHAPES and device.type != "cuda" and not cfg.force:
        raise BenchError(f"shape={cfg.shape} is a GPU benchmark ({SHAPES[cfg.shape]['num_hidden_layers']} layers, "
                         f"~16 GB of weights): on a CPU it takes minutes per token and says nothing; run it on a GPU, "
                         f"or pass force=true")
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # see eval/loading.py: per-shape cuDNN graph builds
    if cfg.shape is not None:
        hf, mask_id = random_model(cfg.shape, dtype, device, cfg.seed)
        tokenizer, block, source, eos = None, cfg.block_size or 16, f"random {cfg.shape}", ()
    else:
        from ..assets.resolve import resolve_model_path
        from ..eval.loading import eos_token_ids, resolve_model_dir
        from ..models.hf import load_dlm

        path = resolve_model_dir(resolve_model_path(cfg.model))
        dlm = load_dlm(path, dtype=dtype, device=device, attn_implementation="sdpa")
        dlm.eval()
        hf, mask_id, tokenizer = dlm.hf, dlm.settings.mask_token_id, dlm.tokenizer
        block, source = cfg.block_size or dlm.settings.inference_block_size, str(path)
        eos = eos_token_ids(tokenizer, getattr(hf, "generation_config", None)) if tokenizer is not None else ()
    return _Setup(hf, None, tokenizer, mask_id, block, device, dtype, tuple(eos) if cfg.use_eos else (), source)


def _adapter(cfg: BenchConfig, setup: _Setup, prompts: list[list[int]]):
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
        from ..eval.tasks import get_task

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
                              eos_token_ids=setup.eos, seed=cfg.seed)
    n_prompts = max(cfg.num_prompts, max(cfg.batch_sizes))
    prompts = _prompts(cfg, setup, n_prompts)
    setup.lm = _adapter(cfg, setup, prompts)
    ctx = (sum(map(len, prompts)) // len(prompts)) + cfg.max_new_tokens // 2
    elsize = torch.tensor([], dtype=setup.dtype).element_size()
    bandwidth = cfg.hbm_tbps or default_bandwidth(setup.device)
    wbytes = weight_bytes(setup.hf)
    rows, forward_cost = [], {}
    def write_report(complete: bool) -> dict[str, Any]:
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
            "results": rows, "forward_cost": table,
        }
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(report, indent=2))
        if complete:
            _plot(report, out / "bench.png")
        return report

    for batch in sorted(set(cfg.batch_sizes)):
        modes = [m for m in cfg.modes if batch == 1 or m in BATCHED_MODES]
        if "ar" not in modes and any(m in ("linear_spec", "quadratic_spec") for m in modes):
            modes = ["ar"] + modes  # the reference for same_as_ar
        # num_prompts per pass, rounded down to whole batches (at least one): batch 1 does not decode all
        # the prompts a wider batch needed
        group = prompts[:max(batch, (cfg.num_prompts // batch) * batch)]
        runs = [TimedRun(m, (lambda chunk, m=m: generate(setup.lm, chunk, m, decode_cfg)),
                         batch if m in BATCHED_MODES else 1) for m in modes]
        if cfg.hf_baseline:
            runs.append(TimedRun(HF_RUN, lambda chunk: _hf_generate(setup, chunk, cfg.max_new_tokens), batch))
        log.info("batch %d: %s over %d prompts, %d warm-ups + %d timed passes, interleaved", batch,
                 [r.name for r in runs], len(group), cfg.warmups, cfg.runs)
        run_interleaved(runs, group, repeats=cfg.runs, warmups=cfg.warmups, device=setup.device)
        counts = {}
        for m in modes:  # one untimed pass per mode: its forwards by (b, q)
            counter = ShapeCounter(setup.lm)
            for i in range(0, len(group), batch if m in BATCHED_MODES else 1):
                generate(counter, group[i:i + (batch if m in BATCHED_MODES else 1)], m, decode_cfg)
            counts[m] = counter.counts
        ar_tokens = next(([_tokens(r) for r in run.results] for run in runs if run.name == "ar"), None)
        shapes = {(b, q, pre) for c in counts.values() for (b, q, pre) in c}
        shapes |= {(batch, q, False) for q in (1, B, B * (B + 1))}
        for b, q, pre in sorted(shapes):
            key = (b, q, pre)
            if key not in forward_cost and (pre or ctx + q <= getattr(setup.lm, "capacity", 1 << 30)):
                forward_cost[key] = _time_forward(setup.lm, b, ctx, q, pre, cfg.sol_repeats, setup.device)
        for run in runs:
            row = _row(run.name, batch, run, ar_tokens, counts.get(run.name))
            if run.name in counts:
                c = counts[run.name]
                predicted = sum(n * forward_cost[k] for k, n in c.items() if k in forward_cost)
                row["predicted_tokens_per_s"] = row["generated_tokens"] / predicted if predicted else None
                if row["predicted_tokens_per_s"]:
                    row["measured_over_predicted"] = row["tokens_per_s"]["median"] / row["predicted_tokens_per_s"]
                if bandwidth:
                    floor = sum(n * (wbytes + kv_bytes(setup.hf.config, b, (0 if pre else ctx) + q, elsize))
                                for (b, q, pre), n in c.items()) / (bandwidth * 1e12)
                    row["roofline_tokens_per_s"] = row["generated_tokens"] / floor
            rows.append(row)
        ar_row = next((r for r in rows if r["mode"] == "ar" and r["batch_size"] == batch), None)
        for r in rows:
            if r["batch_size"] == batch and ar_row is not None:
                r["vs_ar"] = r["tokens_per_s"]["median"] / ar_row["tokens_per_s"]["median"]
        write_report(complete=False)
    report = write_report(complete=True)
    print_report(report)
    return report


def print_report(report: dict[str, Any]) -> None:
    """The results and the forward-cost table, as text."""
    print(f"{report['model']} on {report['device_name']} ({report['dtype']}, {report['lm']}, "
          f"graphs {'on' if report['cuda_graphs'] else 'off'}{', compiled' if report.get('compiled') else ''}), "
          f"B={report['block_size']}")
    print(f"{'batch':>5} {'mode':<15}{'tok/s':>10}{'spread':>8}{'vs ar':>7}{'TPF':>7}{'ms/call':>8}"
          f"{'pred tok/s':>11}{'meas/pred':>10}{'roofline':>10}")
    for r in report["results"]:
        f = lambda k, fmt: "-" if r.get(k) is None else format(r[k], fmt)  # noqa: E731
        print(f"{r['batch_size']:>5} {r['mode']:<15}{r['tokens_per_s']['median']:>10.1f}"
              f"{r['tokens_per_s']['rel_spread']:>7.0%} {f('vs_ar', '.2f'):>6}{f('tpf', '.2f'):>7}"
              f"{f('ms_per_forward', '.2f'):>8}{f('predicted_tokens_per_s', '.1f'):>11}"
              f"{f('measured_over_predicted', '.2f'):>10}{f('roofline_tokens_per_s', '.1f'):>10}")
    print(f"forward cost over {report['context_for_forward_cost']} cached columns:")
    for t in report["forward_cost"]:
        extra = "" if t["roofline_ms"] is None else f"  (roofline {t['roofline_ms']:.2f} ms)"
        ratio = "" if t["vs_q1"] is None else f"  x{t['vs_q1']:.2f} of q=1"
        print(f"  batch {t['batch_size']:>3} q {t['q']:>5}{' prefill' if t['prefill'] else '        '}"
              f" {t['ms']:9.3f} ms{ratio}{extra}")


def _plot(report: dict[str, Any], path: Path) -> None:
    """tokens/s per mode and batch (median, min-max bars, predicted marks) and ms per forward by q."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'nemodiff-train[eval]'): no %s", path.name)
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = report["results"]
    labels = [f"{r['mode']}\nb={r['batch_size']}" for r in rows]
    med = [r["tokens_per_s"]["median"] for r in rows]
    err = [[m - r["tokens_per_s"]["min"] for m, r in zip(med, rows)], [r["tokens_per_s"]["max"] - m for m, r in zip(med, rows)]]
    ax1.bar(range(len(rows)), med, yerr=err, capsize=3, label="measured (median, min-max)")
    pred = [(i, r["predicted_tokens_per_s"]) for i, r in enumerate(rows) if r.get("predicted_tokens_per_s")]
    if pred:
        ax1.scatter(*zip(*pred), marker="_", s=400, color="black", label="speed of light (Σ forward cost)")
    ax1.set_xticks(range(len(rows)), labels, fontsize=7)
    ax1.set_ylabel("tokens/s")
    ax1.legend(fontsize=7)
    ax1.set_title(f"{report['model']} ({report['device_name']})", fontsize=9)
    for b in sorted({t["batch_size"] for t in report["forward_cost"]}):
        pts = [(t["q"], t["ms"]) for t in report["forward_cost"] if t["batch_size"] == b and not t["prefill"]]
        if pts:
            ax2.plot(*zip(*pts), marker="o", label=f"batch {b}")
    ax2.set_xscale("log")
    ax2.set_xlabel("query length q (new tokens per forward)")
    ax2.set_ylabel("ms per forward")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
