"""``.ci/run`` fails, naming the tier, when a tier cannot be set up; ``scripts/test.sh`` reports tiers."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SLURM_TOOLS = re.compile(r"^(slurm\w*|munge\w*|unmunge|sinfo|sbatch|scontrol|srun|squeue|scancel|sacct\w*)$")


def _path_without_slurm(tmp_path: Path) -> str:
    """A PATH holding every tool of this machine except Slurm's and munge's."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            src = Path(d) / name
            if not SLURM_TOOLS.match(name) and not (bindir / name).exists() and os.access(src, os.X_OK):
                (bindir / name).symlink_to(src)
    return str(bindir)


def test_ci_run_fails_when_the_slurm_tier_cannot_be_set_up(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEMODIFF_")}
    env.update(PATH=_path_without_slurm(tmp_path), SLURM_CI_NO_APT="1", SLURM_CI_DIR=str(tmp_path / "slurm"))
    proc = subprocess.run(["bash", str(REPO / ".ci" / "run")], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "CI FAILED: slurm tier" in proc.stderr, proc.stderr[-2000:]
    assert "NEMODIFF_CI_SKIP_TIERS" in proc.stderr  # the developers' explicit opt-out is named
    assert "passed" not in proc.stdout  # nothing ran after the failed set-up


@pytest.mark.parametrize("target, ok", [("tests/unit/test_masks.py", True), ("tests/unit/no_such_test.py", False)])
def test_test_sh_reports_tiers(target, ok):
    env = dict(os.environ, NEMODIFF_TEST_SETUP="0", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(["bash", str(REPO / "scripts" / "test.sh"), target, "-q"], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)
    assert (proc.returncode == 0) == ok, proc.stdout[-2000:]
    summary = proc.stdout.split("== test tiers ==", 1)[1]
    for tier in ("megatron", "slurm", "gpu"):
        assert re.search(rf"^  {tier}: (ran|SKIPPED - .+)$", summary, re.M), summary
    assert f"pytest exit status: {proc.returncode}" in summary
