"""The local Slurm cluster (.ci/setup_slurm.sh) works, and how signals reach a job.

What these tests established on Debian 12's Slurm 22.05.8 (proctrack/linuxproc, task/none,
KillWait=30) -- the launch scripts in slurm/ (see slurm/_launch.sh) rely on it:

  who receives the signal                   batch  child of  srun   child of
                                            shell  batch sh  task   srun task
  scancel --signal=TERM  <job>                -       -       yes     yes
  scancel --signal=USR1  <job>                -       -       yes     yes
  scancel --signal=TERM  --batch <job>       yes      -        -       -
  scancel --signal=USR1  --batch <job>       yes      -        -       -
  scancel --signal=TERM  --full  <job>       yes     yes     KILLED  KILLED   (*)
  scancel --signal=USR1  --full  <job>       yes     yes      yes     yes     (via srun)
  scancel <job>  (plain cancel)              TERM    TERM     TERM    TERM, SIGKILL after KillWait
  (the time limit and `scancel --signal=KILL [--full]` run the same TERM -> KillWait -> KILL
  sequence; to free a job's CPUs at once the fixture SIGKILLs `scontrol listpids` itself)

  * `scancel --signal=TERM` WITHOUT --batch/--full does NOT reach a process the batch script
    started directly (not through srun): it only reaches the processes of srun steps -- all of
    them (the task, its children, grandchildren: e.g. every torchrun worker), not just the task.
  * --batch reaches only the batch shell, none of its children. `#SBATCH --signal=B:USR1@N` is
    the same delivery (batch shell only) N seconds before the time limit.
  * (*) srun forwards most signals (USR1, USR2, ...) to every process of its step, but a SIGTERM
    sent to srun itself (HUP/QUIT too, per srun's source; not measured) makes it "force job
    termination": the step is SIGKILLed,
    its processes never see the TERM. So `--full --signal=TERM` kills an srun-launched trainer
    without a checkpoint, and a batch script must never forward TERM to srun (forward USR1).
  * bash defers traps while a FOREGROUND child runs; the batch script must run srun in the
    background and `wait` (a trapped signal interrupts `wait`) to react at once.
  * On a plain `scancel <job>` the step's processes get SIGTERM from slurmd and have KillWait
    seconds to finish (measured: a 5 s "checkpoint" completes) provided the batch shell traps
    TERM and keeps waiting for srun.
  => The trainer is launched through srun (never directly by the batch script), signals to the
    batch shell are forwarded to srun as USR1, torchrun ignores TERM/USR1 (the workers get them
    straight from slurmstepd), see slurm/_launch.sh.
"""

from __future__ import annotations

import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest

try:  # tests/integration as a package
    from . import slurm_cluster as sc
    from .slurm_cluster import slurm  # noqa: F401  (fixture)
except ImportError:  # rootdir-relative import (no __init__.py)
    import slurm_cluster as sc
    from slurm_cluster import slurm  # noqa: F401  (fixture)

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


def test_two_tasks_srun_hostname_and_python(slurm, tmp_path):
    out = tmp_path / "job.out"
    script = textwrap.dedent(
        f"""\
        #!/bin/bash
        #SBATCH --job-name=infra-2tasks
        #SBATCH --nodes=1
        #SBATCH --ntasks=2
        #SBATCH --time=00:05:00
        #SBATCH --output={out}
        set -euo pipefail
        srun hostname
        srun {PY} -c "import os; print('task', os.environ['SLURM_PROCID'], 'of', os.environ['SLURM_NTASKS'], 'ok')"
        echo "nodes=$SLURM_JOB_NUM_NODES ntasks=$SLURM_NTASKS"
        """
    )
    job = slurm.sbatch(script, cwd=tmp_path)
    slurm.expect_state(job, "COMPLETED", timeout=120)
    text = out.read_text()
    node = sc.job_info(job)["NodeList"]
    assert text.splitlines().count(node) == 2, text
    assert node == socket.gethostname().split(".")[0]
    assert "task 0 of 2 ok" in text and "task 1 of 2 ok" in text, text
    assert "nodes=1 ntasks=2" in text, text
    assert sc.job_info(job)["ExitCode"] == "0:0"


def test_sigterm_reaches_batch_trap_with_full(slurm, tmp_path):
    """`scancel --signal=TERM --full`: the batch shell's trap runs and writes a marker."""
    marker = tmp_path / "trap.marker"
    ready = tmp_path / "ready"
    script = textwrap.dedent(
        f"""\
        #!/bin/bash
        #SBATCH --job-name=infra-trap
        #SBATCH --ntasks=1
        #SBATCH --time=00:05:00
        #SBATCH --output={tmp_path}/job.out
        trap 'echo "TERM at $(date +%s)" > {marker}; exit 0' TERM
        touch {ready}
        # a foreground `sleep 120` would delay the trap until it ends: sleep in the background
        sleep 120 &
        wait
        echo "not reached"
        """
    )
    job = slurm.sbatch(script, cwd=tmp_path)
    sc.wait_for_files([ready], timeout=60, job_id=job)
    sc.scancel_signal(job, "TERM", full=True)
    sc.wait_for_files([marker], timeout=30, job_id=job)
    state = slurm.expect_state(job, "COMPLETED", timeout=60)  # the trap exits 0
    assert state == "COMPLETED"
    assert "TERM at" in marker.read_text()
    assert "not reached" not in sc.job_output(tmp_path / "job.out")


# --- who receives which signal --------------------------------------------------------------

CATCHER = textwrap.dedent(
    """\
    import os, signal, sys, time
    name, d = sys.argv[1], sys.argv[2]
    def handler(sig, frame):
        with open(os.path.join(d, f"{name}.{signal.Signals(sig).name}"), "a") as f:
            f.write(f"{os.getpid()}\\n")
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, handler)
    open(os.path.join(d, f"{name}.ready"), "w").close()
    end = time.time() + 120
    while time.time() < end:
        time.sleep(0.1)
    """
)

MATRIX_JOB = textwrap.dedent(
    """\
    #!/bin/bash
    #SBATCH --ntasks=1
    #SBATCH --time=00:05:00
    D=$1; PY=$2
    for s in TERM USR1; do trap "echo \\$\\$ >> $D/batch.$s" $s; done
    touch $D/batch.ready
    # started directly by the batch script (not through srun)
    $PY $D/catcher.py direct $D &
    # an srun step: a bash task whose child is a python process
    srun -n1 bash -c "$PY $D/catcher.py srun_child $D & \\
        trap 'echo x >> $D/srun_task.SIGTERM' TERM; trap 'echo x >> $D/srun_task.SIGUSR1' USR1; \\
        touch $D/srun_task.ready; while :; do sleep 0.1 & wait; done" &
    for i in $(seq 50); do wait; done
    """
)

# (how, signal) -> processes that must receive it
EXPECTED = {
    ("plain", "TERM"): {"srun_task", "srun_child"},
    ("plain", "USR1"): {"srun_task", "srun_child"},
    ("batch", "TERM"): {"batch"},
    ("batch", "USR1"): {"batch"},
    ("full", "TERM"): {"batch", "direct"},  # srun SIGKILLs its step on TERM
    ("full", "USR1"): {"batch", "direct", "srun_task", "srun_child"},
}
PROCS = ("batch", "direct", "srun_task", "srun_child")


def test_signal_delivery_matrix(slurm, tmp_path):
    """Documents (and guards) the table in the module docstring."""
    jobs = {}
    for how, sig in EXPECTED:
        d = tmp_path / f"{how}-{sig}"
        d.mkdir()
        (d / "catcher.py").write_text(CATCHER)
        job = slurm.sbatch(
            MATRIX_JOB, str(d), PY, cwd=tmp_path, sbatch_args=[f"--job-name=sig-{how}-{sig}", f"--output={d}/job.out"]
        )
        jobs[(how, sig)] = (job, d)
    # the node may run only some at once: handle each as soon as it is ready
    pending = dict(jobs)
    deadline = time.monotonic() + 300
    results = {}
    while pending:
        for key, (job, d) in list(pending.items()):
            if all((d / f"{p}.ready").exists() for p in PROCS):
                how, sig = key
                time.sleep(0.5)
                sc.scancel_signal(job, sig, batch=how == "batch", full=how == "full")
                time.sleep(3)
                results[key] = {p for p in PROCS if (d / f"{p}.SIG{sig}").exists() or (d / f"{p}.{sig}").exists()}
                sc.scancel(job, hard=True)  # the catchers ignore TERM: do not wait KillWait
                del pending[key]
            elif sc.job_state(job) in sc.TERMINAL_STATES:
                raise sc.SlurmError(f"job {job} ({key}) ended before it was ready\n" + sc.diagnostics(job))
        if time.monotonic() > deadline:
            raise sc.SlurmError(
                f"jobs not ready after 300s: {pending}\n" + "\n".join(sc.diagnostics(j) for j, _ in pending.values())
            )
        time.sleep(0.25)
    table = "\n".join(f"  {how:5} {sig:4} -> {sorted(got)}" for (how, sig), got in sorted(results.items()))
    print("signal delivery:\n" + table)
    mismatches = {k: (sorted(results[k]), sorted(v)) for k, v in EXPECTED.items() if results[k] != v}
    assert not mismatches, f"signal delivery differs from the documented table:\n{table}\n(got, expected): {mismatches}"


def test_cancel_gives_step_killwait_to_finish(slurm, tmp_path):
    """Plain `scancel`: the srun step gets SIGTERM and may finish (a 5 s 'checkpoint')."""
    (tmp_path / "slow.py").write_text(
        textwrap.dedent(
            """\
            import os, signal, sys, time
            d = sys.argv[1]
            got = []
            signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
            open(os.path.join(d, "step.ready"), "w").close()
            end = time.time() + 120
            while not got and time.time() < end:
                time.sleep(0.1)
            time.sleep(5)  # "saving a checkpoint"
            open(os.path.join(d, "step.saved"), "w").close()
            """
        )
    )
    script = textwrap.dedent(
        f"""\
        #!/bin/bash
        #SBATCH --ntasks=1
        #SBATCH --time=00:05:00
        #SBATCH --output={tmp_path}/job.out
        trap 'echo "batch got TERM"' TERM
        srun {PY} {tmp_path}/slow.py {tmp_path} &
        pid=$!
        while :; do wait $pid; rc=$?; kill -0 $pid 2>/dev/null || break; done
        echo "srun rc=$rc"
        """
    )
    job = slurm.sbatch(script, cwd=tmp_path)
    sc.wait_for_files([tmp_path / "step.ready"], timeout=60, job_id=job)
    t0 = time.monotonic()
    sc.scancel(job)
    slurm.expect_state(job, "CANCELLED", timeout=90)
    sc.wait_for_files([tmp_path / "step.saved"], timeout=5)
    assert time.monotonic() - t0 >= 4.5
    assert "batch got TERM" in sc.job_output(tmp_path / "job.out")


# --- the real launch path: slurm/pretrain_tiny.sh -> _launch.sh -> srun -> torchrun ------------

FAKE_TRAINER = textwrap.dedent(
    """\
    # Stands in for nemodiff_train.cli.train: honours the contract the slurm scripts rely on.
    import json, os, signal, sys, time
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    run_dir = args["run.dir"]
    rank = os.environ["RANK"]
    os.makedirs(run_dir, exist_ok=True)
    got = []
    def handler(sig, frame):
        got.append(signal.Signals(sig).name)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGUSR1, handler)
    with open(os.path.join(run_dir, f"rank{rank}.started"), "w") as f:
        json.dump({"argv": sys.argv[1:], "world": os.environ["WORLD_SIZE"],
                   "master": os.environ["MASTER_ADDR"] + ":" + os.environ["MASTER_PORT"]}, f)
    end = time.time() + float(args.get("fake.run_s", "120"))
    while not got and time.time() < end:
        time.sleep(0.1)
    if got:
        time.sleep(2)  # "save a checkpoint"
        with open(os.path.join(run_dir, f"rank{rank}.saved"), "w") as f:
            f.write(",".join(got))
    sys.exit(0)
    """
)


def _submit_tiny(slurm, tmp_path, *overrides, env=None, sbatch_args=()):
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir(exist_ok=True)
    (mod_dir / "fake_trainer.py").write_text(FAKE_TRAINER)
    full_env = {
        "PYTHONPATH": f"{mod_dir}:{REPO}",
        "NEMODIFF_TRAIN_MODULE": "fake_trainer",
        "RUNS_ROOT": str(tmp_path / "runs"),
        "PYTHON": PY,
        "TORCHRUN": f"{PY} -m torch.distributed.run",
    }
    full_env.update(env or {})
    return slurm.sbatch(
        REPO / "slurm" / "pretrain_tiny.sh",
        *overrides,
        env=full_env,
        cwd=tmp_path,
        sbatch_args=list(sbatch_args),
    )


def _run_dir(tmp_path, chain_id):
    return tmp_path / "runs" / f"tiny_cpu-{chain_id}"


def test_launcher_forwards_batch_usr1_and_job_completes(slurm, tmp_path):
    """What `#SBATCH --signal=B:USR1@60` does before the time limit, sent now with scancel -b."""
    pytest.importorskip("torch")
    job = _submit_tiny(slurm, tmp_path, "diffusion.block_size=32")
    run_dir = _run_dir(tmp_path, job)
    sc.wait_for_files([run_dir / "rank0.started", run_dir / "rank1.started"], timeout=180, job_id=job)
    sc.scancel_signal(job, "USR1", batch=True)
    slurm.expect_state(job, "COMPLETED", timeout=120)
    out = sc.job_output(job)
    assert sc.job_info(job)["ExitCode"] == "0:0", out
    for rank in (0, 1):
        assert "SIGUSR1" in (run_dir / f"rank{rank}.saved").read_text(), out
    import json

    started = json.loads((run_dir / "rank0.started").read_text())
    assert started["argv"] == ["recipe=tiny_cpu", f"run.dir={run_dir}", "diffusion.block_size=32"]
    assert started["world"] == "2"
    assert "forwarding SIGUSR1 to srun" in out, out
    assert "step exited with code 0 (after SIGUSR1)" in out, out


def test_launcher_usr1_before_the_trainer_listens_is_not_lost(slurm, tmp_path):
    """A pre-timeout USR1 that reaches the batch shell while the trainer is still starting (its
    processes ignore USR1 until they install a handler: SIG_IGN inherited from the step) is repeated
    until the step exits, so the trainer still saves and the job COMPLETES instead of timing out."""
    pytest.importorskip("torch")
    job = _submit_tiny(slurm, tmp_path, env={"ND_RESIGNAL_S": "2"})
    run_dir = _run_dir(tmp_path, job)
    deadline = time.time() + 120
    while "step started" not in sc.job_output(job) and time.time() < deadline:  # srun runs, the trap is set
        time.sleep(0.2)
    sc.scancel_signal(job, "USR1", batch=True)
    early = not (run_dir / "rank0.started").exists() and not (run_dir / "rank1.started").exists()
    slurm.expect_state(job, "COMPLETED", timeout=150)
    out = sc.job_output(job)
    assert early, "the trainer had started before the signal: the early path was not exercised\n" + out
    for rank in (0, 1):
        assert "SIGUSR1" in (run_dir / f"rank{rank}.saved").read_text(), out
    assert "step exited with code 0 (after SIGUSR1)" in out, out


def test_launcher_scancel_term_and_chain(slurm, tmp_path):
    """`scancel --signal=TERM` reaches every trainer process (exit 0, COMPLETED); a chained job
    with CHAIN_ID=<first job> gets the same run directory."""
    pytest.importorskip("torch")
    first = _submit_tiny(slurm, tmp_path)
    run_dir = _run_dir(tmp_path, first)
    sc.wait_for_files([run_dir / "rank0.started", run_dir / "rank1.started"], timeout=180, job_id=first)
    sc.scancel_signal(first, "TERM")
    slurm.expect_state(first, "COMPLETED", timeout=120)
    for rank in (0, 1):
        assert "SIGTERM" in (run_dir / f"rank{rank}.saved").read_text()
    for rank in (0, 1):
        (run_dir / f"rank{rank}.started").unlink()

    second = _submit_tiny(
        slurm,
        tmp_path,
        "fake.run_s=1",
        env={"CHAIN_ID": first},
        sbatch_args=[f"--dependency=afterany:{first}"],
    )
    slurm.expect_state(second, "COMPLETED", timeout=180)
    assert (run_dir / "rank0.started").exists(), sc.job_output(second)
    assert f"RUN_DIR={run_dir}" in sc.job_output(second)


@pytest.mark.slow
def test_launcher_time_limit_signal(slurm, tmp_path):
    """The real `--signal=B:USR1@N` path: with --time=1 and @50 the batch shell gets USR1
    10-60 s after the start (Slurm checks every ~30 s), forwards it, the job COMPLETES."""
    pytest.importorskip("torch")
    job = _submit_tiny(slurm, tmp_path, sbatch_args=["--time=1", "--signal=B:USR1@50"])
    run_dir = _run_dir(tmp_path, job)
    slurm.expect_state(job, "COMPLETED", timeout=150)
    out = sc.job_output(job)
    assert "batch shell got SIGUSR1" in out, out
    for rank in (0, 1):
        assert "SIGUSR1" in (run_dir / f"rank{rank}.saved").read_text(), out
