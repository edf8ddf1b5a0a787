"""Writing and printing the evaluation report: ``eval.json``, ``samples.jsonl``, the plot, the table.

Pure formatting: everything here works on the plain dict rows :mod:`.runner` builds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["write_outputs", "format_table", "print_table", "plot_tpf_accuracy"]

TPF_NOTE = "TPF = generated tokens / model forwards, prefill forwards excluded (ALGORITHMS.md §3.6)."


def write_outputs(out: Path, rows: list[dict[str, Any]], sample_rows: list[dict[str, Any]],
                  config: dict[str, Any] | None = None) -> None:
    """Write ``eval.json``, ``samples.jsonl``, ``eval_config.json`` and ``tpf_accuracy.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    with (out / "samples.jsonl").open("w", encoding="utf-8") as f:
        for row in sample_rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if config is not None:
        (out / "eval_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    plot_tpf_accuracy(rows, out / "tpf_accuracy.png")
    log.info("wrote %s", ", ".join(str(out / n) for n in ("eval.json", "samples.jsonl", "tpf_accuracy.png")))


def _metric_names(rows: list[dict[str, Any]]) -> list[str]:
    """Accuracy metric columns, in the task's order (each row lists its task's ``metric_names``)."""
    names: list[str] = []
    for row in rows:
        names.extend(k for k in row.get("metric_names", []) if k not in names)
    return names


def format_table(rows: list[dict[str, Any]]) -> str:
    """The report as a fixed-width table (mode | TPF | tok/s | speed vs ar | metrics | lossless)."""
    metrics = _metric_names(rows)
    ar_tps = next((r["tokens_per_s"] for r in rows if r["mode"] == "ar"), None)
    header = ["mode", "TPF", "tok/s", "vs ar"] + metrics + ["lossless"]
    lines = []
    for r in rows:
        speed = f"{r['tokens_per_s'] / ar_tps:.2f}x" if ar_tps else "-"
        mode = r["mode"] if r.get("requested", True) else f"{r['mode']} (ref)"
        cells = [mode, f"{r['tpf']:.2f}", f"{r['tokens_per_s']:.1f}", speed]
        cells += [f"{r[m]:.3f}" if m in r else "-" for m in metrics]
        cells.append(f"{r['lossless']:.3f}" if "lossless" in r else "-")
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    text = [fmt.format(*header), "-+-".join("-" * w for w in widths)] + [fmt.format(*c) for c in lines]
    if rows:
        r0 = rows[0]
        text.append(f"task {r0['task']}, {r0['samples']} samples, block {r0['block_size']}, "
                    f"tau {r0['threshold']}, temperature {r0['temperature']}, {r0['dtype']} on {r0['device']}")
    text.append(TPF_NOTE)
    if any("lossless" in r for r in rows):
        text.append("lossless = fraction of samples whose output equals AR greedy output token for token.")
    return "\n".join(text)


def print_table(rows: list[dict[str, Any]]) -> None:
    print(format_table(rows), flush=True)


def plot_tpf_accuracy(rows: list[dict[str, Any]], path: Path) -> bool:
    """Accuracy (the task's primary metric) against TPF: one point per mode, a line for the τ sweep.

    Returns False (and logs why) when matplotlib is missing; the plot is a convenience, the numbers
    are in ``eval.json``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on training/eval machines
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'nemodiff-train[eval]'); skipping %s", path)
        return False
    if not rows:
        return False
    metric = rows[0].get("primary_metric", "token_accuracy")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        ax.scatter([r["tpf"]], [r[metric]], s=50, zorder=3, label=r["mode"])
        ax.annotate(r["mode"], (r["tpf"], r[metric]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        sweep = r.get("tau_sweep") or []
        if sweep:
            xs, ys = [p["tpf"] for p in sweep], [p[metric] for p in sweep]
            ax.plot(xs, ys, "--", color="gray", zorder=2, label="diffusion, tau sweep")
            for p in sweep:
                ax.annotate(f"τ={p['threshold']:g}", (p["tpf"], p[metric]), textcoords="offset points",
                            xytext=(4, -10), fontsize=7, color="gray")
    ax.set_xlabel("tokens per forward (prefill excluded)")
    ax.set_ylabel(metric)
    ax.set_ylim(-0.05, 1.05)  # metrics are fractions; a fixed scale keeps plots of different runs comparable
    ax.set_title(f"{rows[0]['task']}: accuracy vs TPF")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
