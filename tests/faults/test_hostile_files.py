"""Hostile files on the real paths (tests/faults/hostile.py): a shared run directory's DCP
``.metadata`` replaced by each case of the pickle corpus (``manifest.json`` deleted, as older or
hand-made checkpoints lack it), and checkpoints whose byte entries are pickled calls. Export and
resume refuse each with a named error, and the marker file every case would create never appears.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.hostile_pickles import build_corpus

from .harness import ROOT, base_args, env, launch, metrics
from .hostile import byte_entry_run, metadata_corpus, poisoned_run

pytestmark = pytest.mark.faults


def test_every_hostile_metadata_is_refused_by_export_and_resume(baseline, tmp_path):
    """The library calls behind nemodiff-export (export_checkpoint) and the trainer's resume
    (select_resume, which verifies each checkpoint by reading its .metadata), for every case."""
    report = metadata_corpus(baseline, tmp_path)
    assert report["cases"] >= 30 and report["live_attacks"] >= 20
    assert set(report["families"]) >= {"global", "dotted", "function", "opcode", "registry", "embedded"}
    assert report["failures"] == [] and report["ran"] == 0
    assert report["refused_export"] == report["refused_resume"] == report["cases"]


def _dotted_case(marker: Path) -> bytes:
    return next(c.data for c in build_corpus(marker) if c.name == "dotted_torch_distributed_checkpoint_metadata__os_system")


def test_cli_export_refuses_the_dotted_name_attack(baseline, tmp_path):
    """The issue's reproduction: `nemodiff-export checkpoint=<dir>` with manifest.json deleted."""
    marker = tmp_path / "ran"
    run = poisoned_run(baseline, tmp_path / "run", _dotted_case(marker))
    out = subprocess.run([sys.executable, "-m", "nemodiff_train.cli.export", f"checkpoint={run}",
                          f"out={tmp_path / 'hf'}"], capture_output=True, text=True, env=env(), cwd=str(ROOT),
                         timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert "refusing to import torch.distributed.checkpoint.metadata.os.system" in text and "Traceback" not in text
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_cli_resume_refuses_the_dotted_name_attack(assets, baseline, tmp_path):
    marker = tmp_path / "ran"
    run = poisoned_run(baseline, tmp_path / "run", _dotted_case(marker))
    (run / "metrics.jsonl").unlink()
    r = launch(base_args(assets, run, "export.at_end=false"), run)
    assert r.returncode == 3, r.output[-3000:]
    assert r.output.count("refusing to import torch.distributed.checkpoint.metadata.os.system") >= 2, r.output[-3000:]
    assert "Traceback" not in r.output and not marker.exists() and metrics(run) == []


@pytest.mark.slow  # two CLI resumes; the planner's refusal itself is in tests/unit/test_dcp_metadata_pickle.py
@pytest.mark.parametrize("where,named", [("optim", "refusing checkpoint entry 'optim.param_groups.0.lr'"),
                                         ("model", "refusing checkpoint entry 'model.")])
def test_cli_resume_refuses_a_hostile_byte_entry(assets, baseline, tmp_path, where, named):
    """Optimizer settings are DCP byte entries, which DCP's default planner reads with
    torch.load(weights_only=False): resume reads them with weights_only=True, and none under model."""
    marker = tmp_path / "ran"
    run = byte_entry_run(baseline, tmp_path / "run", where, marker)
    (run / "metrics.jsonl").unlink()
    r = launch(base_args(assets, run, "export.at_end=false"), run)
    assert r.returncode == 3 and named in r.output, r.output[-3000:]
    assert "Traceback" not in r.output and not marker.exists() and metrics(run) == []


def test_export_refuses_a_model_byte_entry(baseline, tmp_path):
    from nemodiff_train.export import export_checkpoint
    from nemodiff_train.export.errors import ExportError

    marker = tmp_path / "ran"
    run = byte_entry_run(baseline, tmp_path / "run", "model", marker)
    with pytest.raises(ExportError, match="norm.weight' is not a tensor"):
        export_checkpoint(run, tmp_path / "hf")
    assert not marker.exists() and not (tmp_path / "hf").exists()
