"""tools/frontier_plot.py: points read from eval.json rows (AR accuracy with its interval, linear_spec TPF)."""

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import frontier_plot  # noqa: E402


def _eval(path: Path, ar: float, tpf: float, base: float | None = None) -> Path:
    rows = [{"task": "arithmetic", "mode": "ar", "sweep": None, "primary_metric": "exact_match", "exact_match": ar,
             "exact_match_ci95": [ar - 0.1, ar + 0.1], "tpf": 1.0, "samples": 100},
            {"task": "arithmetic", "mode": "linear_spec", "sweep": None, "primary_metric": "exact_match",
             "exact_match": ar, "tpf": tpf, "samples": 100},
            {"task": "arithmetic", "mode": "diffusion", "sweep": "threshold", "tpf": 9.0, "samples": 100}]
    if base is not None:
        rows.append({"task": "arithmetic", "mode": "base", "sweep": None, "primary_metric": "exact_match",
                     "exact_match": base, "exact_match_ci95": [base - 0.1, base + 0.1], "tpf": 1.0, "samples": 100})
    path.mkdir()
    (path / "eval.json").write_text(json.dumps(rows))
    return path


def test_points_base_and_plot(tmp_path, capsys):
    a = _eval(tmp_path / "a", 0.6, 2.5, base=0.7)
    b = _eval(tmp_path / "b", 0.65, 2.0)
    points, base = frontier_plot.frontier_points({"plain/2e-3": a, "plain/1e-3": b}, "arithmetic")
    assert [(p["ar"], p["tpf"]) for p in points] == [(0.6, 2.5), (0.65, 2.0)] and base["acc"] == 0.7
    frontier_plot.main([f"plain/2e-3={a}", f"plain/1e-3={b}", "--out", str(tmp_path / "f.png")])
    assert (tmp_path / "f.png").stat().st_size > 0 and "linear_spec TPF 2.50" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="needs ar and linear_spec"):
        frontier_plot.frontier_points({"x": a}, "code_completion")
