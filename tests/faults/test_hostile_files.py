"""Hostile files on the real paths: a shared run directory's DCP ``.metadata`` replaced by each case
of the pickle corpus (tests/helpers/hostile_pickles.py), ``manifest.json`` deleted as older or
hand-made checkpoints lack it. Export and resume must refuse each with a named error, and the marker
file that every case would create must not exist afterwards (nothing ran).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nemodiff_train import runs
from tests.helpers.hostile_pickles import build_corpus, registered_extensions

from .harness import ROOT, base_args, env, launch, metrics

pytestmark = pytest.mark.faults


def poisoned_run(baseline: Path, dest: Path, data: bytes) -> Path:
    """A copy of the reference run whose every checkpoint has ``data`` as ``.metadata`` and no manifest."""
    shutil.copytree(baseline, dest, ignore=shutil.ignore_patterns("hf", "eval"))
    for ckpt in runs.step_dirs(dest):
        (ckpt / runs.DCP_METADATA).write_bytes(data)
        (ckpt / runs.MANIFEST).unlink()
    return dest


def test_every_hostile_metadata_is_refused_by_export_and_resume(baseline, tmp_path):
    """The library calls of nemodiff-export (export_checkpoint) and of the trainer's resume
    (select_resume, which verifies by reading .metadata), for all cases."""
    from nemodiff_train.engines.torch.checkpointing import CheckpointError, select_resume
    from nemodiff_train.export import export_checkpoint
    from nemodiff_train.export.errors import ExportError

    marker = tmp_path / "ran"
    cases = build_corpus(marker)
    assert len(cases) >= 30
    run = poisoned_run(baseline, tmp_path / "run", cases[0].data)
    metadata_files = [c / runs.DCP_METADATA for c in runs.step_dirs(run)]
    failures = []
    with registered_extensions():
        for case in cases:
            for f in metadata_files:
                f.write_bytes(case.data)
            try:
                export_checkpoint(run, tmp_path / f"out_{case.name}")
                failures.append(f"{case.name}: exported")
            except ExportError as e:
                if "refusing" not in str(e) or "nothing in the file was run" not in str(e):
                    failures.append(f"{case.name}: export error without a named refusal: {e}")
            try:
                select_resume(run)
                failures.append(f"{case.name}: resumable")
            except CheckpointError as e:
                if str(e).count("UnsafeCheckpointError") != len(metadata_files):
                    failures.append(f"{case.name}: resume error without a named refusal per checkpoint: {e}")
            if marker.exists() or (tmp_path / f"out_{case.name}").exists():
                failures.append(f"{case.name}: something ran or was written")
    assert not failures, "\n".join(failures)


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
    (run / runs.METRICS_FILE).unlink()
    r = launch(base_args(assets, run, "export.at_end=false"), run)
    assert r.returncode == 3, r.output[-3000:]
    assert r.output.count("refusing to import torch.distributed.checkpoint.metadata.os.system") >= 2, r.output[-3000:]
    assert "Traceback" not in r.output and not marker.exists() and metrics(run) == []
