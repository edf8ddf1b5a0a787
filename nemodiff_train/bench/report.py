"""``nemodiff-bench``'s report: the crossover batch size, the printed table and the plot.

The crossover answers a serving user's question: up to which concurrency does self-speculation pay?
Speculation spends extra compute per forward (B or B(B+1) query tokens per row) to cut the number of
forwards; at batch 1 a forward is bound by reading the weights, so the extra tokens are nearly free, and
as the batch grows the forward turns compute bound and the extra tokens cost their full price.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..decoding.modes import SPECULATIVE_MODES

log = logging.getLogger(__name__)

__all__ = ["crossovers", "describe_crossover", "print_report", "plot_report"]



def crossovers(rows: list[dict[str, Any]], reference: str = "ar") -> dict[str, dict[str, Any]]:
    """Per self-speculation mode in ``rows``: the first batch size (ascending) at which its median tokens/s
    is no longer above ``reference``'s.

    Returns:
        ``{mode: {"vs": reference, "batch_size": b or None, "beats_up_to": largest b below it where it
        beat the reference, or None}}``; ``batch_size`` None = it beat the reference at every batch size
        measured (the crossover lies beyond the sweep).
    """
    tps = {(r["mode"], r["batch_size"]): r["tokens_per_s"]["median"] for r in rows}
    out = {}
    for mode in SPECULATIVE_MODES:
        sizes = sorted(b for (m, b) in tps if m == mode and (reference, b) in tps)
        if not sizes:
            continue
        cross = next((b for b in sizes if tps[(mode, b)] <= tps[(reference, b)]), None)
        beat = [b for b in sizes if (cross is None or b < cross)]
        out[mode] = {"vs": reference, "batch_size": cross, "beats_up_to": beat[-1] if beat else None}
    return out


def describe_crossover(cross: dict[str, Any]) -> str:
    if cross["batch_size"] is None:
        return f"beats {cross['vs']} at every batch size measured (up to {cross['beats_up_to']})"
    if cross["beats_up_to"] is None:
        return f"does not beat {cross['vs']} even at batch {cross['batch_size']}"
    return (f"beats {cross['vs']} up to batch {cross['beats_up_to']}, stops at batch {cross['batch_size']}")


def print_report(report: dict[str, Any]) -> None:
    """The results and the forward-cost table, as text."""
    print(f"{report['model']} on {report['device_name']} ({report['dtype']}, {report['lm']}, "
          f"graphs {'on' if report['cuda_graphs'] else 'off'}{', compiled' if report.get('compiled') else ''}), "
          f"B={report['block_size']}")
    print(f"{'batch':>5} {'mode':<15}{'tok/s':>10}{'spread':>8}{'vs ar':>7}{'TPF':>7}{'ms/call':>8}"
          f"{'pred tok/s':>11}{'meas/pred':>10}{'roofline':>10}{'syncs/tok':>10}")
    for r in report["results"]:
        f = lambda k, fmt: "-" if r.get(k) is None else format(r[k], fmt)  # noqa: E731
        print(f"{r['batch_size']:>5} {r['mode']:<15}{r['tokens_per_s']['median']:>10.1f}"
              f"{r['tokens_per_s']['rel_spread']:>7.0%} {f('vs_ar', '.2f'):>6}{f('tpf', '.2f'):>7}"
              f"{f('ms_per_forward', '.2f'):>8}{f('predicted_tokens_per_s', '.1f'):>11}"
              f"{f('measured_over_predicted', '.2f'):>10}{f('roofline_tokens_per_s', '.1f'):>10}"
              f"{f('host_syncs_per_token', '.3f'):>10}")
    for mode, cross in report.get("crossover", {}).items():
        print(f"crossover {mode}: {describe_crossover(cross)}")
    if report.get("batch_sizes_not_fitting"):
        print(f"did not fit in device memory: batch sizes {report['batch_sizes_not_fitting']}")
    print(f"forward cost over {report['context_for_forward_cost']} cached columns:")
    for t in report["forward_cost"]:
        extra = "" if t["roofline_ms"] is None else f"  (roofline {t['roofline_ms']:.2f} ms)"
        ratio = "" if t["vs_q1"] is None else f"  x{t['vs_q1']:.2f} of q=1"
        print(f"  batch {t['batch_size']:>3} q {t['q']:>5}{' prefill' if t['prefill'] else '        '}"
              f" {t['ms']:9.3f} ms{ratio}{extra}")


def plot_report(report: dict[str, Any], path: Path) -> None:
    """tokens/s per mode and batch (median, min-max bars, predicted marks), tokens/s against batch size,
    and ms per forward by q."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'nemodiff-train[eval]'): no %s", path.name)
        return
    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(17, 4.5))
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
    for mode in dict.fromkeys(r["mode"] for r in rows):
        pts = sorted((r["batch_size"], r["tokens_per_s"]["median"]) for r in rows if r["mode"] == mode)
        ax3.plot(*zip(*pts), marker="o", label=mode)
    for mode, cross in report.get("crossover", {}).items():
        if cross["batch_size"] is not None:
            ax3.axvline(cross["batch_size"], linestyle=":", color="gray")
    ax3.set_xscale("log", base=2)
    ax3.set_yscale("log")
    ax3.set_xlabel("batch size")
    ax3.set_ylabel("tokens/s (all rows)")
    ax3.set_title("throughput vs batch (dotted: where self-speculation stops beating ar)", fontsize=8)
    ax3.legend(fontsize=7)
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
