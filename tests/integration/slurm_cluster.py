"""Helpers for tests that run jobs on a REAL local Slurm cluster.

The cluster is the single-node one started by ``.ci/setup_slurm.sh`` (Debian's slurmctld +
slurmd + munge, no slurmdbd). Tests that use it carry ``@pytest.mark.slurm`` and either take the
``slurm`` fixture or call :func:`require_slurm`; both skip with a clear message when Slurm is not
running (set ``NEMODIFF_REQUIRE_SLURM=1`` to turn the skip into a failure, e.g. in CI where
setup_slurm.sh ran).

Import it from a test module next to it::

    try:
        from . import slurm_cluster as sc      # if tests/integration becomes a package
    except ImportError:
        import slurm_cluster as sc             # rootdir-relative import (no __init__.py)
    from slurm_cluster import slurm            # noqa: F401  (the fixture)

Job states: without slurmdbd ``sacct`` answers "Slurm accounting storage is disabled", so
:func:`wait_job` reads ``scontrol show job -o``; setup_slurm.sh sets ``MinJobAge=600`` so a
finished job stays visible for 10 minutes. When sacct works (a cluster with accounting) it is
used as the fallback for jobs scontrol no longer knows.

Every waiting helper has a timeout and, when it fails, raises :class:`SlurmError` whose message
holds the job record, the job's stdout/stderr tails and the slurmctld/slurmd log tails.
"""

from __future__ import annotations

import os
import re
import shutil
import signal as _signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pytest

__all__ = [
    "SlurmError",
    "TERMINAL_STATES",
    "slurm_available",
    "slurm_unavailable_reason",
    "require_slurm",
    "sbatch",
    "wait_job",
    "job_state",
    "job_info",
    "scancel",
    "scancel_signal",
    "job_pids",
    "job_output",
    "wait_for_files",
    "diagnostics",
    "slurm",
    "SlurmSession",
]

TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "SPECIAL_EXIT",
        "REVOKED",
    }
)
# sinfo %T long states that cannot take new jobs; anything else (idle, mixed, allocated,
# completing, planned, ...) is a live node (jobs may queue behind running ones).
UNUSABLE_NODE_STATES = (
    "down",
    "drain",
    "fail",
    "unknown",
    "future",
    "inval",
    "maint",
    "reboot",
    "power",
    "not_responding",
)


def _node_usable(state: str) -> bool:
    s = state.lower()
    if s.endswith("*"):  # not responding
        return False
    return not s.rstrip("~#$@+!%-^").startswith(UNUSABLE_NODE_STATES)


CMD_TIMEOUT = 30.0  # seconds for one Slurm client command
SETUP_HINT = "start it with `.ci/setup_slurm.sh` (as root; Debian's slurmctld/slurmd/munge)"


class SlurmError(AssertionError):
    """A Slurm command or wait failed; the message carries the diagnostics."""


# ------------------------------------------------------------------------------------------------
# low level
# ------------------------------------------------------------------------------------------------


def _run(
    cmd: Sequence[str],
    *,
    timeout: float = CMD_TIMEOUT,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(
            list(cmd),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
    except FileNotFoundError as exc:
        raise SlurmError(f"{cmd[0]} not found: {exc}. {SETUP_HINT}") from exc
    except subprocess.TimeoutExpired as exc:
        raise SlurmError(f"`{' '.join(map(str, cmd))}` timed out after {timeout}s") from exc
    if check and proc.returncode != 0:
        raise SlurmError(
            f"`{' '.join(map(str, cmd))}` exited {proc.returncode}\n"
            f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}"
        )
    return proc


def _tail(path: str | os.PathLike | None, lines: int = 60) -> str:
    if not path:
        return "<no path>"
    p = Path(path)
    if not p.exists():
        return f"<{p} does not exist>"
    try:
        text = p.read_text(errors="replace")
    except OSError as exc:  # pragma: no cover - permissions etc.
        return f"<cannot read {p}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------------------------------------
# cluster
# ------------------------------------------------------------------------------------------------


def slurm_unavailable_reason(timeout: float = 10.0) -> str | None:
    """None when Slurm answers and a node is usable, else why not (for skip messages).

    Cheap checks first: with no slurm.conf the clients retry for 60 s, and with slurmctld down
    `sinfo` takes ~30 s, while `scontrol ping` answers at once.
    """
    if shutil.which("sinfo") is None or shutil.which("scontrol") is None:
        return f"Slurm client commands are not installed (no `sinfo`/`scontrol` on PATH); {SETUP_HINT}"
    conf = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
    if not os.path.exists(conf):
        return f"no Slurm config ({conf} does not exist); {SETUP_HINT}"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"`scontrol ping` did not answer within {timeout}s; {SETUP_HINT}"
    if "is UP" not in ping.stdout:
        first = (ping.stdout.strip() or ping.stderr.strip()).splitlines()[:1]
        return f"slurmctld is not up ({first[0] if first else ping.returncode}); {SETUP_HINT}"
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %T"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return f"`sinfo` did not answer within {timeout}s (slurmctld down?); {SETUP_HINT}"
    if proc.returncode != 0:
        return f"`sinfo` failed ({proc.stderr.strip() or proc.returncode}); {SETUP_HINT}"
    states = [line.split()[-1] for line in proc.stdout.splitlines() if line.strip()]
    if not states:
        return f"`sinfo` lists no nodes; {SETUP_HINT}"
    if not any(_node_usable(s) for s in states):
        return f"no usable Slurm node (states: {', '.join(states)}); {SETUP_HINT}"
    return None


def slurm_available(timeout: float = 10.0) -> bool:
    """True when `sinfo` responds and a node is usable: idle/mixed (or allocated/planned/...: up
    but busy, jobs queue)."""
    return slurm_unavailable_reason(timeout) is None


_SESSION_UNAVAILABLE: str | None = None  # a cluster found down stays down for this session


def require_slurm() -> None:
    """Skip the calling test (fail under NEMODIFF_REQUIRE_SLURM=1) when Slurm is not usable."""
    global _SESSION_UNAVAILABLE
    reason = _SESSION_UNAVAILABLE or slurm_unavailable_reason()
    if reason is None:
        return
    _SESSION_UNAVAILABLE = reason
    if os.environ.get("NEMODIFF_REQUIRE_SLURM") == "1":
        pytest.fail(f"NEMODIFF_REQUIRE_SLURM=1 but {reason}", pytrace=False)
    pytest.skip(f"Slurm not available: {reason}")


def slurm_config() -> dict[str, str]:
    """`scontrol show config` as a dict ({} when it fails)."""
    try:
        proc = _run(["scontrol", "show", "config"], check=False)
    except SlurmError:
        return {}
    conf: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            conf[key.strip()] = value.strip()
    return conf


def daemon_log_tails(lines: int = 40) -> str:
    conf = slurm_config()
    parts = []
    for key in ("SlurmctldLogFile", "SlurmdLogFile"):
        path = conf.get(key)
        if path and path != "(null)":
            parts.append(f"----- tail -n {lines} {path} -----\n{_tail(path, lines)}")
        else:
            parts.append(f"----- {key}: not configured -----")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------
# jobs
# ------------------------------------------------------------------------------------------------

_KEY_RE = re.compile(r"(?:^|\s)([A-Za-z][\w/:.]*)=")


def _parse_oneliner(line: str) -> dict[str, str]:
    """Parse one `scontrol show job -o` line (values may contain spaces)."""
    matches = list(_KEY_RE.finditer(line))
    info: dict[str, str] = {}
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
        info[m.group(1)] = line[m.end() : end].strip()
    return info


def job_info(job_id: str | int) -> dict[str, str] | None:
    """The `scontrol show job -o` record of a job, or None when slurmctld no longer knows it."""
    proc = _run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        if "Invalid job id" in proc.stderr or "Invalid job id" in proc.stdout:
            return None
        raise SlurmError(f"scontrol show job {job_id} failed: {proc.stderr.strip()}")
    # a job array / het job prints several lines: take the one of this id
    for line in proc.stdout.splitlines():
        info = _parse_oneliner(line)
        if info.get("JobId") == str(job_id):
            return info
    return _parse_oneliner(proc.stdout.splitlines()[0])


_SACCT_WORKS: bool | None = None


def _sacct_state(job_id: str | int) -> str | None:
    global _SACCT_WORKS
    if _SACCT_WORKS is False or shutil.which("sacct") is None:
        return None
    proc = _run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"], check=False)
    if proc.returncode != 0 or "disabled" in (proc.stdout + proc.stderr).lower():
        _SACCT_WORKS = False
        return None
    _SACCT_WORKS = True
    line = proc.stdout.strip().splitlines()
    return line[0].split()[0] if line and line[0].strip() else None


def job_state(job_id: str | int) -> str | None:
    """Current state (COMPLETED, RUNNING, ...; "CANCELLED by 0" -> CANCELLED) or None if unknown."""
    info = job_info(job_id)
    if info is not None and info.get("JobState"):
        return info["JobState"].split()[0]
    return _sacct_state(job_id)


def _job_paths(job_id: str | int, info: Mapping[str, str] | None = None) -> dict[str, str]:
    info = info if info is not None else (job_info(job_id) or {})
    paths = {}
    for key in ("StdOut", "StdErr"):
        value = info.get(key)
        if value and value != "(null)":
            paths[key] = value
    return paths


def diagnostics(
    job_id: str | int | None = None,
    extra_files: Iterable[str | os.PathLike] = (),
    lines: int = 80,
) -> str:
    """Everything useful to debug a job: its record, stdout/stderr tails, daemon log tails."""
    parts = []
    if job_id is not None:
        try:
            info = job_info(job_id)
        except SlurmError as exc:
            info = None
            parts.append(f"scontrol show job {job_id}: {exc}")
        if info is None:
            parts.append(f"===== job {job_id}: unknown to scontrol =====")
        else:
            keys = (
                "JobId JobName JobState Reason ExitCode DerivedExitCode RunTime TimeLimit "
                "Restarts NodeList NumNodes NumCPUs NumTasks Command WorkDir StdOut StdErr"
            ).split()
            record = " ".join(f"{k}={info[k]}" for k in keys if k in info)
            parts.append(f"===== job {job_id} =====\n{record}")
            seen = set()
            for key, path in _job_paths(job_id, info).items():
                if path in seen:
                    continue
                seen.add(path)
                parts.append(f"----- job {key} {path} (last {lines} lines) -----\n{_tail(path, lines)}")
    for path in extra_files:
        parts.append(f"----- {path} (last {lines} lines) -----\n{_tail(path, lines)}")
    try:
        sinfo = _run(["sinfo", "-N", "-l"], check=False).stdout.strip()
        squeue = _run(["squeue", "-l"], check=False).stdout.strip()
        parts.append(f"----- sinfo -N -l -----\n{sinfo}\n----- squeue -l -----\n{squeue}")
    except SlurmError as exc:
        parts.append(f"sinfo/squeue: {exc}")
    parts.append(daemon_log_tails())
    return "\n".join(parts)


def sbatch(
    script: str | os.PathLike,
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    sbatch_args: Sequence[str] = (),
    timeout: float = CMD_TIMEOUT,
) -> str:
    """Submit `script` (a path, or the text of a script starting with "#!") with `args`.

    `env` is ADDED to os.environ (sbatch's default --export=ALL passes the result to the job);
    `cwd` is the submit directory (default %j output files land there); `sbatch_args` go before
    the script (e.g. ["--time=1", "--output=/x/%j.out"]). Returns the job id.
    """
    tmp_script = None
    if isinstance(script, str) and script.startswith("#!"):
        fd, tmp_script = tempfile.mkstemp(prefix="sbatch-", suffix=".sh", dir=cwd)
        with os.fdopen(fd, "w") as f:
            f.write(script)
        os.chmod(tmp_script, 0o755)
        script = tmp_script
    full_env = dict(os.environ)
    if env:
        full_env.update({k: str(v) for k, v in env.items()})
    cmd = ["sbatch", "--parsable", *sbatch_args, str(script), *map(str, args)]
    try:
        proc = _run(cmd, env=full_env, cwd=cwd, timeout=timeout, check=False)
    finally:
        if tmp_script is not None:  # sbatch stored its own copy
            os.unlink(tmp_script)
    if proc.returncode != 0:
        raise SlurmError(f"`{' '.join(cmd)}` exited {proc.returncode}: {proc.stderr.strip()}\n" + daemon_log_tails())
    out = proc.stdout.strip().splitlines()
    job_id = out[-1].split(";")[0].strip() if out else ""
    if not job_id.isdigit():
        raise SlurmError(f"cannot parse the job id from sbatch --parsable output {proc.stdout!r}")
    return job_id


def wait_job(
    job_id: str | int,
    timeout: float = 300.0,
    poll: float = 0.5,
    states: Iterable[str] = TERMINAL_STATES,
    extra_files: Iterable[str | os.PathLike] = (),
) -> str:
    """Wait until the job reaches one of `states` (default: any terminal state); return it.

    Raises SlurmError (with diagnostics) on timeout or when the job disappears.
    """
    wanted = set(states)
    deadline = time.monotonic() + timeout
    state = None
    while True:
        state = job_state(job_id)
        if state is None:
            raise SlurmError(
                f"job {job_id} is unknown to scontrol (purged? MinJobAge) and sacct\n"
                + diagnostics(job_id, extra_files)
            )
        if state in wanted:
            return state
        if state in TERMINAL_STATES and wanted.isdisjoint(TERMINAL_STATES):
            raise SlurmError(
                f"job {job_id} ended {state} while waiting for {sorted(wanted)}\n" + diagnostics(job_id, extra_files)
            )
        if time.monotonic() > deadline:
            raise SlurmError(
                f"job {job_id} still {state} after {timeout}s (waiting for {sorted(wanted)})\n"
                + diagnostics(job_id, extra_files)
            )
        time.sleep(poll)


def wait_for_files(
    paths: Iterable[str | os.PathLike],
    timeout: float = 120.0,
    job_id: str | int | None = None,
    poll: float = 0.25,
) -> None:
    """Wait until every path exists; fail early (with diagnostics) if the job ends first."""
    paths = [Path(p) for p in paths]
    deadline = time.monotonic() + timeout
    while True:
        missing = [p for p in paths if not p.exists()]
        if not missing:
            return
        state = job_state(job_id) if job_id is not None else None
        ended = state in TERMINAL_STATES if state else False
        if ended or time.monotonic() > deadline:
            # one last look: the job may have written them just before ending
            missing = [p for p in paths if not p.exists()]
            if not missing:
                return
            why = f"job {job_id} ended {state}" if ended else f"timed out after {timeout}s"
            raise SlurmError(
                f"{why}; missing: {', '.join(map(str, missing))}\n"
                + (diagnostics(job_id) if job_id is not None else daemon_log_tails())
            )
        time.sleep(poll)


def _sig_name(sig: int | str | _signal.Signals) -> str:
    if isinstance(sig, str):
        return sig.upper().removeprefix("SIG")
    return _signal.Signals(sig).name.removeprefix("SIG")


def scancel_signal(
    job_id: str | int, sig: int | str | _signal.Signals, *, batch: bool = False, full: bool = False
) -> None:
    """`scancel --signal=SIG [--batch|--full] job` (see test_slurm_infra.py for who receives it)."""
    cmd = ["scancel", f"--signal={_sig_name(sig)}"]
    if full:
        cmd.append("--full")
    elif batch:
        cmd.append("--batch")
    _run([*cmd, str(job_id)])


def job_pids(job_id: str | int) -> list[int]:
    """Pids of the job's processes on THIS host (`scontrol listpids`; [] when none/unknown)."""
    proc = _run(["scontrol", "listpids", str(job_id)], check=False)
    pids = []
    for line in proc.stdout.splitlines()[1:]:
        field = line.split()[0] if line.split() else ""
        if field.isdigit():
            pids.append(int(field))
    return pids


def scancel(job_id: str | int, *, hard: bool = False) -> None:
    """Cancel a job (SIGTERM to everything, SIGKILL after KillWait); no error if it is gone.

    hard=True: also SIGKILL the job's processes on this host at once, so that a job whose
    processes ignore SIGTERM does not hold its CPUs for KillWait. (`scancel --signal=KILL`, with
    or without --full, does NOT do that: slurmd treats it as a normal cancel, TERM first.)
    """
    pids = job_pids(job_id) if hard else []
    _run(["scancel", str(job_id)], check=False)
    for pid in pids:
        try:
            os.kill(pid, _signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def job_output(path_or_job: str | os.PathLike | int, missing_ok: bool = True) -> str:
    """Text of a job's output file: a path, or a job id (its StdOut from scontrol)."""
    if isinstance(path_or_job, int) or (isinstance(path_or_job, str) and path_or_job.isdigit()):
        paths = _job_paths(path_or_job)
        if "StdOut" not in paths:
            if missing_ok:
                return ""
            raise SlurmError(f"job {path_or_job}: no StdOut known")
        path = Path(paths["StdOut"])
    else:
        path = Path(path_or_job)
    if not path.exists():
        if missing_ok:
            return ""
        raise SlurmError(f"job output {path} does not exist")
    return path.read_text(errors="replace")


# ------------------------------------------------------------------------------------------------
# pytest fixture
# ------------------------------------------------------------------------------------------------


class SlurmSession:
    """Per-test handle: the same helpers, plus cleanup of the jobs the test submitted."""

    def __init__(self) -> None:
        self.jobs: list[str] = []

    def sbatch(self, script, *args, **kwargs) -> str:
        job_id = sbatch(script, *args, **kwargs)
        self.jobs.append(job_id)
        return job_id

    wait_job = staticmethod(wait_job)
    wait_for_files = staticmethod(wait_for_files)
    job_state = staticmethod(job_state)
    job_info = staticmethod(job_info)
    job_output = staticmethod(job_output)
    scancel_signal = staticmethod(scancel_signal)
    scancel = staticmethod(scancel)
    diagnostics = staticmethod(diagnostics)

    def expect_state(self, job_id, expected: str | Iterable[str], timeout: float = 300.0, **kw) -> str:
        """Wait for the job to end; assert its state, with diagnostics when it differs."""
        exp = {expected} if isinstance(expected, str) else set(expected)
        state = wait_job(job_id, timeout=timeout, **kw)
        if state not in exp:
            raise SlurmError(f"job {job_id} ended {state}, expected {sorted(exp)}\n" + diagnostics(job_id))
        return state

    def cleanup(self) -> None:
        for job_id in self.jobs:
            try:
                state = job_state(job_id)
            except SlurmError:
                continue
            if state is not None and state not in TERMINAL_STATES:
                scancel(job_id, hard=True)  # do not leave it holding CPUs for KillWait


@pytest.fixture
def slurm():
    """Skip unless Slurm runs; yields a SlurmSession and cancels the test's unfinished jobs."""
    require_slurm()
    session = SlurmSession()
    try:
        yield session
    finally:
        session.cleanup()
