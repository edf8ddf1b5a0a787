"""Writing and printing the evaluation report: ``eval.json``, ``samples.jsonl``, the plot, the table.

Pure formatting: everything here works on the plain dict rows :mod:`.runner` builds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..runs import EVAL_JSON

log = logging.getLogger(__name__)

__all__ = ["write_outputs", "format_table", "print_table", "plot_tpf_accuracy"]

TPF_NOTE = "TPF = generated tokens / model forwards, prefill forwards excluded (docs/method.md)."


def write_outputs(out: Path, rows: list[dict[str, Any]], sample_rows: list[dict[str, Any]],
                  config: dict[str, Any] | None = None) -> None:
    """Write ``eval.json``, ``samples.jsonl``, ``eval_config.json`` and ``tpf_accuracy.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / EVAL_JSON).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    with (out / "samples.jsonl").open("w", encoding="utf-8") as f:
        for row in sample_rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if config is not None:
        (out / "eval_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    plot_tpf_accuracy(rows, out / "tpf_accuracy.png")
    log.info("wrote %s", ", ".join(str(out / n) for n in (EVAL_JSON, "samples.jsonl", "tpf_accuracy.png")))


def _metric_names(rows: list[dict[str, Any]]) -> list[str]:
    """Accuracy metric columns, in the task's order (each row lists its task's ``metric_names``)."""
    names: list[str] = []
    for row in rows:
        names.extend(k for k in row.get("metric_names", []) if k not in names)
    return names


def _main_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if not r.get("sweep")]


def _ar_speed(rows: list[dict[str, Any]]) -> dict[str, float]:
    """AR tokens/s per task (the ``vs ar`` denominator)."""
    return {r["task"]: r["tokens_per_s"] for r in _main_rows(rows) if r["mode"] == "ar" and r["tokens_per_s"] > 0}


def _render(header: list[str], lines: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), "-+-".join("-" * w for w in widths)] + [fmt.format(*c) for c in lines]


def format_table(rows: list[dict[str, Any]]) -> str:
    """The report as fixed-width text: one line per task × mode (TPF, tokens/s, ÷ AR, accuracy,
    lossless), then the sweep points, if any, and the settings."""
    ar_tps = _ar_speed(rows)
    header = ["task", "mode", "TPF", "tok/s", "vs ar", "accuracy", "lossless"]

    def cells(r: dict[str, Any], label: str) -> list[str]:
        base = ar_tps.get(r["task"])
        metric = r.get("primary_metric")
        ci = r.get(f"{metric}_ci95")
        acc = (f"{r[metric]:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "") + f" ({metric})") if metric in r else "-"
        return [r["task"], label, f"{r['tpf']:.2f}", f"{r['tokens_per_s']:.1f}",
                f"{r['tokens_per_s'] / base:.2f}x" if base else "-", acc,
                f"{r['lossless']:.3f}" if "lossless" in r else "-"]

    main = [cells(r, r["mode"] if r.get("requested", True) else f"{r['mode']} (ref)") for r in _main_rows(rows)]
    text = _render(header, main)
    sweep = [r for r in rows if r.get("sweep")]
    if sweep:
        text += ["", "sweep points (the curve of tpf_accuracy.png):"]
        label = {"threshold": lambda r: f"{r['mode']} tau={r['threshold']:g}",
                 "block_size": lambda r: f"{r['mode']} B={r['block_size']}",
                 "commit_rule": lambda r: f"{r['mode']} rule={r['commit_rule']}"}
        text += _render(header, [cells(r, label[r["sweep"]](r)) for r in sweep])
    if rows:
        r0 = rows[0]
        counts = {r["task"]: r["samples"] for r in rows}
        samples = (f"{r0['samples']} samples each" if len(set(counts.values())) == 1
                   else ", ".join(f"{n} samples of {t}" for t, n in counts.items()))
        text.append(f"{len(counts)} task(s), {samples}, block {r0['block_size']}, "
                    f"tau {r0['threshold']}"
                    + (f" (commit rule {r0['commit_rule']})" if r0.get("commit_rule", "confident") != "confident" else "")
                    + f", temperature {r0['temperature']}, {r0['dtype']} on {r0['device']}; "
                    "modes interleaved per prompt, so tok/s ratios share the machine's load")
    text.append(TPF_NOTE)
    if any(any(k.endswith("_ci95") for k in r) for r in rows):
        text.append("[low, high] = 95 % interval of the accuracy over the samples (Wilson for 0/1 metrics).")
    if any(r["mode"] == "base" for r in rows):
        text.append("base = the untouched base model, AR decoding, same rows and settings (the conversion's cost).")
    if any("lossless" in r for r in rows):
        text.append("lossless = fraction of samples whose output equals AR greedy output token for token.")
    return "\n".join(text)


def print_table(rows: list[dict[str, Any]]) -> None:
    print(format_table(rows), flush=True)


MODE_STYLE = {  # colour, marker: one per mode, the same in every panel
    "base": ("grey", "X"),
    "ar": ("black", "*"),
    "diffusion": ("tab:blue", "o"),
    "linear_spec": ("tab:orange", "s"),
    "quadratic_spec": ("tab:green", "D"),
}


def _sweep_label(r: dict[str, Any]) -> str:
    if r["mode"] != "diffusion":
        return f"B={r['block_size']}"
    rule = r.get("commit_rule", "confident")
    if r.get("sweep") == "commit_rule":
        return rule
    return f"τ={r['threshold']:g}" + ("" if rule == "confident" or r.get("sweep") else f", {rule}")


def _panel(ax, rows: list[dict[str, Any]]) -> None:
    """One task: a marker per mode at the main setting, a line per mode through its sweep points."""
    metric = rows[0].get("primary_metric", "token_accuracy")
    main = _main_rows(rows)
    for mode, (colour, marker) in MODE_STYLE.items():
        points = [r for r in rows if r["mode"] == mode and (r.get("sweep") or r in main)]
        for p in (p for p in points if p.get("sweep") == "commit_rule"):  # another decoder: a point, no line
            ax.scatter([p["tpf"]], [p[metric]], facecolors="none", edgecolors=colour, marker=marker, s=60, zorder=3)
            ax.annotate(_sweep_label(p), (p["tpf"], p[metric]), textcoords="offset points", xytext=(6, -12),
                        fontsize=7, color=colour)
        points = [p for p in points if p.get("sweep") != "commit_rule"]
        if not points:
            continue
        key = "threshold" if mode == "diffusion" else "block_size"
        points.sort(key=lambda r: r[key])
        if len(points) > 1:
            ax.plot([p["tpf"] for p in points], [p[metric] for p in points], "-", color=colour, alpha=0.5, lw=1.2)
        for i, p in enumerate(points):
            is_main = not p.get("sweep")
            ax.scatter([p["tpf"]], [p[metric]], color=colour, marker=marker, s=90 if is_main else 30,
                       edgecolors="black" if is_main else "none", zorder=3,
                       label=f"{mode} ({_sweep_label(p)})" if is_main and mode not in ("ar", "base") else (mode if is_main else None))
            if len(points) > 1:  # label the sweep, alternating sides so neighbours do not stack
                ax.annotate(_sweep_label(p), (p["tpf"], p[metric]), textcoords="offset points",
                            xytext=(6, 6 if i % 2 == 0 else -12), fontsize=7, color=colour)
    ar = next((r for r in main if r["mode"] == "ar"), None)
    if ar is not None:
        ax.axhline(ar[metric], color="black", ls=":", lw=0.8, alpha=0.6)
    xs = [r["tpf"] for r in rows]
    ys = [r[metric] for r in rows]
    pad_x = max(0.1, 0.08 * (max(xs) - min(xs)))
    pad_y = max(0.02, 0.12 * (max(ys) - min(ys)))
    ax.set_xlim(min(xs) - pad_x, max(xs) + 2 * pad_x)  # axes fit the data: differences stay visible
    ax.set_ylim(max(0.0, min(ys) - pad_y) if min(ys) >= 0 else min(ys) - pad_y, min(1.0, max(ys) + pad_y) + 0.01)
    ax.set_xlabel("tokens per forward (prefill excluded)")
    ax.set_ylabel(metric)
    ax.set_title(f"{rows[0]['task']}: {metric} vs TPF")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def plot_tpf_accuracy(rows: list[dict[str, Any]], path: Path) -> bool:
    """Accuracy (each task's primary metric) against TPF: one panel per task, AR as the reference.

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
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        _panel(ax, [r for r in rows if r["task"] == task])
    fig.suptitle("accuracy vs tokens per forward (dotted: AR accuracy)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
