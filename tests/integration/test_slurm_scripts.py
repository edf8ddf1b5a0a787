"""The slurm/ launch scripts, without Slurm: syntax, headers, and the resolved launch command
(NEMODIFF_DRY_RUN=1 with a faked SLURM_* environment)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "slurm"
CI_DIR = REPO / ".ci"

SCRIPTS = {
    # script: (recipe, default engine); the node count must be the recipe's "Hardware:" line
    "pretrain_3b.sh": ("nld_3b_pretrain", None),
    "pretrain_8b.sh": ("nld_8b_pretrain", "megatron"),
    "pretrain_8b_longctx.sh": ("nld_8b_longctx", "megatron"),
    "pretrain_14b.sh": ("nld_14b_pretrain", "megatron"),
    "sft_3b.sh": ("nld_3b_sft", None),
    "sft_8b.sh": ("nld_8b_sft", "megatron"),
    "sft_14b.sh": ("nld_14b_sft", "megatron"),
}
ALL_SCRIPTS = sorted(SLURM_DIR.glob("*.sh")) + sorted(CI_DIR.glob("*slurm*.sh"))

# SLURM_* variables of the test process (e.g. pytest run inside an allocation) would leak in
_CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NEMODIFF_"))}
for _k in (
    "RUN_DIR",
    "RUNS_ROOT",
    "CHAIN_ID",
    "ENGINE",
    "GPUS_PER_NODE",
    "NPROC_PER_NODE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NNODES",
    "TORCHRUN",
    "SRUN_EXTRA_ARGS",
    "TORCHRUN_EXTRA_ARGS",
    "MODEL",
    "OUT",
    "AUTO_REQUEUE",
    "RECIPE",
):
    _CLEAN_ENV.pop(_k, None)


def fake_slurm_env(**overrides) -> dict[str, str]:
    env = dict(_CLEAN_ENV)
    env.update(
        {
            "NEMODIFF_DRY_RUN": "1",
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "nld_8b_pretrain",
            "SLURM_JOB_NODELIST": "gpu[003-004,010]",
            "SLURM_NNODES": "3",
            "SLURM_GPUS_ON_NODE": "8",
            "SLURM_SUBMIT_DIR": str(REPO),
        }
    )
    env.update({k: str(v) for k, v in overrides.items()})
    return env


@pytest.fixture
def no_scontrol_path(tmp_path) -> str:
    """A PATH with the basic tools but without Slurm's commands (nor torchrun)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "dirname", "hostname", "date", "mkdir", "grep", "sed", "cat", "python"):
        found = shutil.which(tool)
        if found:
            (bindir / tool).symlink_to(found)
    return str(bindir)


def dry_run(script: str, *args: str, env: dict[str, str], cwd: Path | None = None):
    proc = subprocess.run(
        ["bash", str(SLURM_DIR / script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or REPO,
        timeout=60,
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if "command: " in line]
    assert len(lines) == 1, proc.stdout
    return shlex.split(lines[0].split("command: ", 1)[1]), proc.stdout


def split_launch(cmd: list[str]):
    """-> (srun options, torchrun options, module, trainer args)."""
    assert cmd[0] == "srun", cmd
    i = cmd.index("nemodiff-step")
    srun_opts = cmd[1 : i - 3]
    assert cmd[i - 3 : i] == ["bash", "-c", 'trap "" TERM USR1 USR2; exec "$@"'], cmd
    rest = cmd[i + 1 :]
    m = len(rest) - 1 - rest[::-1].index("-m")  # the last -m (TORCHRUN may be `python -m ...`)
    return srun_opts, rest[:m], rest[m + 1], rest[m + 2 :]


# -------------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("script", ALL_SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    if script.name != "_launch.sh":
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), script
        assert "set -euo pipefail" in text, script


@pytest.mark.unit
def test_all_expected_scripts_exist():
    names = {p.name for p in SLURM_DIR.glob("*.sh")}
    assert set(SCRIPTS) | {"_launch.sh", "eval.sh", "pretrain_tiny.sh"} <= names


@pytest.mark.unit
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_headers(script):
    recipe, engine = SCRIPTS[script]
    text = (SLURM_DIR / script).read_text()
    headers = dict((m.group(1), m.group(2)) for m in re.finditer(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    # the recipe's memory/throughput estimates are for its stated hardware: the script must ask for it
    recipe_nodes = re.search(r"^# Hardware: (\d+) nodes x 8 ", (REPO / "recipes" / f"{recipe}.yaml").read_text(), re.M)
    assert recipe_nodes, f"recipes/{recipe}.yaml has no '# Hardware: N nodes x 8 ...' line"
    assert headers["nodes"] == recipe_nodes.group(1)
    assert headers["gpus-per-node"] == "8"
    assert headers["ntasks-per-node"] == "1"
    assert "exclusive" in headers and "requeue" in headers
    assert headers["time"] == "04:00:00"
    assert headers["signal"] == "B:USR1@300"
    assert headers["output"] == "%x-%j.out"
    assert headers["open-mode"] == "append"  # a requeued job keeps the log of its earlier runs
    assert f"export RECIPE={recipe}" in text
    # chaining recipe in the header comment
    assert f"jid=$(sbatch --parsable slurm/{script})" in text
    assert f"sbatch --dependency=afterany:$jid --export=ALL,CHAIN_ID=$jid slurm/{script}" in text


@pytest.mark.unit
@pytest.mark.parametrize("with_scontrol", [False, True], ids=["fallback-parser", "scontrol"])
def test_dry_run_8b_multinode(with_scontrol, no_scontrol_path, tmp_path):
    env = fake_slurm_env(RUNS_ROOT=tmp_path / "runs")
    if with_scontrol:
        if shutil.which("scontrol") is None:
            pytest.skip("scontrol not installed")
    else:
        env["PATH"] = no_scontrol_path
    cmd, out = dry_run("pretrain_8b.sh", "diffusion.block_size=32", "data.name=a b", env=env)
    srun, torchrun, module, args = split_launch(cmd)
    assert {"--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1"} <= set(srun)
    assert "--nnodes=3" in torchrun and "--nproc-per-node=8" in torchrun
    assert "--rdzv-backend=c10d" in torchrun
    assert "--rdzv-endpoint=gpu003:24242" in torchrun  # first host, 20000 + 4242
    assert "--rdzv-id=4242" in torchrun
    assert "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT" in torchrun
    assert module == "nemodiff_train.cli.train"
    run_dir = tmp_path / "runs" / "nld_8b_pretrain-4242"
    assert args == [
        "recipe=nld_8b_pretrain",
        f"run.dir={run_dir}",
        "engine=megatron",
        "diffusion.block_size=32",
        "data.name=a b",
    ]
    assert not run_dir.exists()  # dry run creates nothing
    assert "continue this run with: sbatch --dependency=afterany:4242 --export=ALL,CHAIN_ID=4242" in out


@pytest.mark.unit
@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("node1", "node1"),
        ("a,b", "a"),
        ("pre[01-04,07],other", "pre01"),
        ("gpu[7]", "gpu7"),
        ("x-1[2-3]", "x-12"),
        ("h[5,9]", "h5"),
    ],
)
def test_first_host_fallback_parser(nodelist, first, no_scontrol_path):
    proc = subprocess.run(
        ["bash", "-c", f'source {shlex.quote(str(SLURM_DIR / "_launch.sh"))}; nd_first_host "$1"', "_", nodelist],
        capture_output=True,
        text=True,
        env={"PATH": no_scontrol_path},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == first
    if shutil.which("scontrol"):  # the real parser agrees
        real = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if real.returncode == 0:
            assert real.stdout.split()[0] == first


@pytest.mark.unit
def test_run_dir_chain_id_and_overrides(tmp_path):
    base = fake_slurm_env(RUNS_ROOT=tmp_path / "r")
    # default: one run dir per chain; chain id = this job's id
    _, _, _, args = split_launch(dry_run("pretrain_3b.sh", env={**base, "SLURM_JOB_NAME": "nld_3b_pretrain"})[0])
    assert args == ["recipe=nld_3b_pretrain", f"run.dir={tmp_path}/r/nld_3b_pretrain-4242"]  # no engine for 3B
    # a chained job: CHAIN_ID = the first job's id
    env = {**base, "SLURM_JOB_ID": "4300", "SLURM_JOB_NAME": "nld_3b_pretrain", "CHAIN_ID": "4242"}
    _, torchrun, _, args = split_launch(dry_run("pretrain_3b.sh", env=env)[0])
    assert args[1] == f"run.dir={tmp_path}/r/nld_3b_pretrain-4242"
    assert "--rdzv-id=4300" in torchrun and "--rdzv-endpoint=gpu003:24300" in torchrun
    # RUN_DIR wins; ENGINE picks an engine; an empty ENGINE drops the 8B default
    env = {**base, "RUN_DIR": "/x/run", "ENGINE": "megatron"}
    _, _, _, args = split_launch(dry_run("sft_3b.sh", "k=v", env=env)[0])
    assert args == ["recipe=nld_3b_sft", "run.dir=/x/run", "engine=megatron", "k=v"]
    _, _, _, args = split_launch(dry_run("sft_8b.sh", env={**base, "ENGINE": ""})[0])
    assert not any(a.startswith("engine=") for a in args)
    # default RUNS_ROOT is $PWD/runs
    env = {k: v for k, v in base.items() if k != "RUNS_ROOT"}
    _, _, _, args = split_launch(dry_run("sft_14b.sh", env=env, cwd=tmp_path)[0])
    assert args[:3] == ["recipe=nld_14b_sft", f"run.dir={tmp_path}/runs/nld_8b_pretrain-4242", "engine=megatron"]


@pytest.mark.unit
def test_tiny_cpu_single_node(no_scontrol_path, tmp_path):
    env = fake_slurm_env(
        PATH=no_scontrol_path,
        SLURM_JOB_NODELIST="vm",
        SLURM_NNODES="1",
        SLURM_JOB_NAME="tiny_cpu",
        SLURM_JOB_ID="7",
        RUNS_ROOT=tmp_path,
    )
    del env["SLURM_GPUS_ON_NODE"]
    srun, torchrun, module, args = split_launch(dry_run("pretrain_tiny.sh", "stages.0.steps=3", env=env)[0])
    assert "--nodes=1" in srun and "--ntasks-per-node=1" in srun
    assert "--nnodes=1" in torchrun and "--nproc-per-node=2" in torchrun
    assert "--rdzv-endpoint=vm:20007" in torchrun
    assert args == ["recipe=tiny_cpu", f"run.dir={tmp_path}/tiny_cpu-7", "stages.0.steps=3"]
    # NPROC_PER_NODE overrides; torchrun falls back to `python -m torch.distributed.run`
    assert torchrun[:3] == ["python", "-m", "torch.distributed.run"]
    _, torchrun, _, _ = split_launch(dry_run("pretrain_tiny.sh", env={**env, "NPROC_PER_NODE": "4"})[0])
    assert "--nproc-per-node=4" in torchrun
    text = (SLURM_DIR / "pretrain_tiny.sh").read_text()
    assert "--gpus" not in text and "#SBATCH --nodes=1" in text


@pytest.mark.unit
def test_extra_args_and_master_overrides(tmp_path):
    env = fake_slurm_env(
        RUNS_ROOT=tmp_path,
        SRUN_EXTRA_ARGS="--mpi=none --container-image=x.sqsh",
        TORCHRUN_EXTRA_ARGS="--max-restarts=0",
        MASTER_PORT="29500",
        GPUS_PER_NODE="4",
    )
    srun, torchrun, _, _ = split_launch(dry_run("pretrain_14b.sh", env=env)[0])
    assert "--mpi=none" in srun and "--container-image=x.sqsh" in srun
    assert "--max-restarts=0" in torchrun
    assert "--rdzv-endpoint=gpu003:29500" in torchrun and "--nproc-per-node=4" in torchrun


@pytest.mark.unit
def test_eval_script(tmp_path):
    env = fake_slurm_env(MODEL="/ckpt/model", OUT=str(tmp_path / "ev"))
    proc = subprocess.run(
        ["bash", str(SLURM_DIR / "eval.sh"), "tasks=gsm8k"], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if "command: " in x)
    cmd = shlex.split(line.split("command: ", 1)[1])
    assert cmd[:3] == ["srun", "--nodes=1", "--ntasks=1"]
    assert cmd[3:] == [
        "python",
        "-m",
        "nemodiff_train.cli.evaluate",
        "model=/ckpt/model",
        f"out={tmp_path}/ev",
        "tasks=gsm8k",
    ]
    # MODEL is required
    env.pop("MODEL")
    proc = subprocess.run(["bash", str(SLURM_DIR / "eval.sh")], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode != 0 and "MODEL" in proc.stderr


@pytest.mark.unit
def test_refuses_to_run_outside_slurm(tmp_path):
    env = dict(_CLEAN_ENV)
    proc = subprocess.run(
        ["bash", str(SLURM_DIR / "pretrain_8b.sh")], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert "not inside a Slurm job" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.unit
def test_step_wrapper_leaves_term_usr1_ignored_for_exec():
    """The srun task wrapper makes torchrun start with TERM/USR1/USR2 ignored (SIG_IGN survives
    exec); a trainer installs its own handlers, which replace it."""
    code = (
        "import signal as s; print([s.getsignal(x) == s.SIG_IGN for x in (s.SIGTERM, s.SIGUSR1, s.SIGUSR2, s.SIGINT)])"
    )
    proc = subprocess.run(
        ["bash", "-c", 'trap "" TERM USR1 USR2; exec "$@"', "nemodiff-step", sys.executable, "-c", code],
        capture_output=True,
        text=True,
    )
    # SIGINT is left as it was: ignored only where this process inherited it ignored (a job started
    # with `&` from a non-interactive shell ignores SIGINT, and Python then keeps it ignored).
    sigint_ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    assert proc.stdout.strip() == f"[True, True, True, {sigint_ignored}]", proc.stderr


WORKER = textwrap.dedent(
    """\
    import os, signal, sys, time
    got = []
    signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    ready = os.path.join(sys.argv[1], "ready" + os.environ["RANK"])
    with open(ready + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(ready + ".tmp", ready)
    end = time.time() + 60
    while not got and time.time() < end:
        time.sleep(0.05)
    time.sleep(1)  # "checkpoint"
    open(os.path.join(sys.argv[1], "saved" + os.environ["RANK"]), "w").close()
    sys.exit(0)
    """
)


@pytest.mark.integration
def test_torchrun_with_ignored_term_exits_zero(tmp_path):
    """What a Slurm cancel does to the step, without Slurm: SIGTERM to torchrun AND every worker.
    torchrun started through the wrapper ignores it, the workers save and exit 0, and torchrun
    exits 0 (a torchrun that handles TERM itself exits 1: see slurm/_launch.sh)."""
    pytest.importorskip("torch")
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**_CLEAN_ENV, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            "bash",
            "-c",
            'trap "" TERM USR1 USR2; exec "$@"',
            "nemodiff-step",
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            "--nproc-per-node=2",
            "--rdzv-backend=c10d",
            "--rdzv-endpoint=127.0.0.1:0",
            "--rdzv-id=t",
            "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT",
            str(tmp_path / "worker.py"),
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.1)
        # like slurmstepd on a cancel: every process of the step (torchrun puts its workers in
        # their own sessions, so a process-group kill would miss them; Slurm's proctrack does not)
        for pid in [proc.pid] + [int((tmp_path / f"ready{r}").read_text()) for r in (0, 1)]:
            os.kill(pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    assert (tmp_path / "saved0").exists() and (tmp_path / "saved1").exists(), out
