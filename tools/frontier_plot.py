"""The accuracy-versus-speed frontier of several conversions: AR accuracy against ``linear_spec`` TPF.

Each argument is ``label=<eval dir or eval.json>``; the points come from the evaluations' main rows of one
task (``--task``, default ``arithmetic``), with their 95 % intervals as error bars, and the untouched base's
accuracy (a ``base`` row, ``nemodiff-eval base_model=...``) as a horizontal band when present. Points that
share a marker group (the text before ``/`` in the label, e.g. ``plain/lr=2e-3``) are joined by a line.

    python tools/frontier_plot.py plain/2e-3=runs/a/eval plain/1e-3=runs/b/eval terms/2e-3=runs/c/eval \\
        --out docs/frontier.png

Prints the table it plots (label, AR accuracy [interval], linear_spec TPF, samples).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    path = path / "eval.json" if path.is_dir() else path
    return json.loads(path.read_text())


def frontier_points(evals: dict[str, Path], task: str) -> tuple[list[dict], dict | None]:
    """One point per evaluation: its AR accuracy (primary metric, with interval) and linear_spec TPF; and the
    base row (the first one found), if any."""
    points, base = [], None
    for label, path in evals.items():
        main = [r for r in _rows(path) if r["task"] == task and not r.get("sweep")]
        by_mode = {r["mode"]: r for r in main}
        if "ar" not in by_mode or "linear_spec" not in by_mode:
            raise SystemExit(f"{path}: needs ar and linear_spec rows of task {task!r}")
        ar = by_mode["ar"]
        metric = ar["primary_metric"]
        points.append({"label": label, "metric": metric, "ar": ar[metric], "ci": ar.get(f"{metric}_ci95"),
                       "tpf": by_mode["linear_spec"]["tpf"], "samples": ar["samples"]})
        if base is None and "base" in by_mode:
            base = {"acc": by_mode["base"][metric], "ci": by_mode["base"].get(f"{metric}_ci95")}
    return points, base


def plot(points: list[dict], base: dict | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.6, 5.0))
    groups = list(dict.fromkeys(p["label"].split("/")[0] for p in points))
    palette = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")  # one colour per group, never reused
    for i, g in enumerate(groups):
        pts = sorted((p for p in points if p["label"].split("/")[0] == g), key=lambda p: p["tpf"])
        colour = palette(i)
        ax.plot([p["tpf"] for p in pts], [p["ar"] for p in pts], "-o", color=colour, label=g)
        for p in pts:
            if p["ci"]:
                ax.errorbar(p["tpf"], p["ar"], yerr=[[p["ar"] - p["ci"][0]], [p["ci"][1] - p["ar"]]], color=colour,
                            capsize=3, lw=0.8)
            ax.annotate(p["label"].split("/", 1)[-1], (p["tpf"], p["ar"]), textcoords="offset points",
                        xytext=(5, 5), fontsize=7, color=colour)
    if base is not None:
        ax.axhline(base["acc"], color="grey", ls=":", label="untouched base (AR)")
        if base["ci"]:
            ax.axhspan(base["ci"][0], base["ci"][1], color="grey", alpha=0.12)
    ax.set_xlabel("linear_spec tokens per forward (lossless)")
    ax.set_ylabel(f"AR {points[0]['metric']} (95 % interval)")
    ax.set_title(f"conversion frontier, {points[0]['samples']} held-out rows each")
    ax.grid(alpha=0.3)
    ax.margins(x=0.12)  # room for the labels of the outermost points
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a point
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("evals", nargs="+", help="label=<eval dir or eval.json>")
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--out", type=Path, default=Path("frontier.png"))
    args = ap.parse_args(argv)
    evals = {}
    for item in args.evals:
        if "=" not in item:
            raise SystemExit(f"{item!r}: expected label=<eval dir or eval.json>")
        label, path = item.split("=", 1)
        evals[label] = Path(path)
    points, base = frontier_points(evals, args.task)
    for p in points:
        ci = f"[{p['ci'][0]:.2f}, {p['ci'][1]:.2f}]" if p["ci"] else ""
        print(f"{p['label']:<24} AR {p['metric']} {p['ar']:.3f} {ci}  linear_spec TPF {p['tpf']:.2f}  "
              f"({p['samples']} rows)")
    if base is not None:
        print(f"{'base':<24} AR {points[0]['metric']} {base['acc']:.3f}")
    plot(points, base, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
