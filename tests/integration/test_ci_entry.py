"""``.ci/run`` fails, naming the tier, when a tier cannot be set up, and runs the whole suite;
``scripts/test.sh`` selects the default (not slow) or all tests and reports the selection and the tiers."""

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


def _test_sh(*args: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NEMODIFF_TEST_ALL"}
    env.update(NEMODIFF_TEST_SETUP="0", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **env_extra)
    return subprocess.run(["bash", str(REPO / "scripts" / "test.sh"), *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)


@pytest.mark.parametrize("args, ok", [(["tests/unit/test_masks.py"], True), (["tests/unit/no_such_test.py"], False),
                                      (["--all", "tests/unit/test_masks.py"], True)])
def test_test_sh_reports_selection_and_tiers(args, ok):
    proc = _test_sh(*args, "-q")
    assert (proc.returncode == 0) == ok, proc.stdout[-2000:]
    summary = proc.stdout.split("== test tiers ==", 1)[1]
    everything = "--all" in args
    selection = re.search(r"^  selection: (\w+)", summary, re.M)
    assert selection and selection.group(1) == ("all" if everything else "default"), summary
    for tier in ("megatron", "slurm", "gpu"):
        if tier == "slurm" and not everything:  # the whole tier is slow: neither set up nor run
            assert re.search(r"^  slurm: not selected \(slow; scripts/test.sh --all runs it\)$", summary, re.M), summary
        else:
            assert re.search(rf"^  {tier}: (ran|SKIPPED - .+)$", summary, re.M), summary
    assert f"pytest exit status: {proc.returncode}" in summary


SLOW_README_TEST = "tests/integration/test_readme_commands.py::test_readme_commands_run_offline"


@pytest.mark.parametrize("args, env", [([], {}), (["--all"], {}), ([], {"NEMODIFF_TEST_ALL": "1"})],
                         ids=["default", "--all", "NEMODIFF_TEST_ALL"])
def test_default_selection_leaves_out_the_slow_tests_and_all_keeps_them(args, env):
    """Collection only: which tests each selection would run (a slow README test, the Slurm tier)."""
    proc = _test_sh(*args, "tests/integration/test_readme_commands.py", "tests/integration/test_slurm_infra.py",
                    "--collect-only", **env)  # test.sh's -q: one line per test
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    collected = {line for line in proc.stdout.splitlines() if "::" in line}
    # the README-accounting checks run in every selection
    assert "tests/integration/test_readme_commands.py::test_every_readme_command_is_accounted_for" in collected
    slurm = {t for t in collected if t.startswith("tests/integration/test_slurm_infra.py::")}
    if args or env:
        assert SLOW_README_TEST in collected and slurm, collected
    else:
        assert SLOW_README_TEST not in collected and not slurm, collected

