"""Every command in README.md runs offline as written, or is marked as needing the Hub with an offline
counterpart, or is named here with the test (or CI step) that runs it.

The commands are read from the README itself (every line of its ```bash blocks and every inline code
span that is a command with arguments), and the tables below must list exactly those: a command
added to, changed in or removed from the README fails :func:`test_every_readme_command_is_accounted_for`
until this file says how it is exercised. Long runs are exercised in a cheap form that keeps the
command and adds or swaps only size knobs (:data:`RUN`); everything runs offline (``HF_HUB_OFFLINE``),
from a scratch working directory, as a user would type it (``bash -c``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

DEMO = "bash scripts/demo.sh"
TRAIN = "nemodiff-train recipe=demo_cpu run.dir=runs/x diffusion.block_size=32 optim.lr=1e-5"
ADAPTER_DEMO = "nemodiff-train recipe=demo_cpu_adapter run.dir=runs/demo_adapter"
ADAPTER_FIGURES = "python tools/adapter_figures.py --rank 16"
CHECK_BASE = "python tools/check_against_base.py runs/demo_adapter/eval --base nemodiff_train/assets/tiny_qwen3"
TORCHRUN = "torchrun --nproc-per-node=2 -m nemodiff_train.cli.train recipe=tiny_cpu run.dir=runs/y engine.distributed=fsdp2"
DATA = ("nemodiff-data pretrain --source 'data/*.jsonl:0.7' --source code.parquet:0.3 --tokenizer runs/x/hf "
        "--seq-len 4096 --out prepared/")
EVAL = ("nemodiff-eval model=runs/x/hf modes=[ar,diffusion,linear_spec,quadratic_spec] "
        "task=[arithmetic,code_completion] out=runs/x/eval")
SWEEP = ("nemodiff-eval model=runs/x/hf task=arithmetic sweep.threshold=[0.5,0.7,0.9] sweep.block_size=[4,8,16] "
         "out=runs/x/sweep")
HEADROOM_X = "nemodiff-eval analysis=headroom model=runs/x/hf task=[arithmetic,code_completion] out=runs/x/headroom"
EVAL_JSONL = "nemodiff-eval model=runs/x/hf modes=[ar,linear_spec] task=my_rows.jsonl out=runs/x/eval_mine"
EXPORT = "nemodiff-export checkpoint=runs/x out=exports/x dtype=bfloat16 remote_code=true"
PUSH_DRY = "nemodiff-export out=exports/x push_to_hub=org/name dry_run=true"
LM_EVAL = ("nemodiff-lm-eval --model nemodiff --model_args pretrained=runs/x/hf,mode=linear_spec "
           "--tasks nemodiff_code_completion --limit 20")
HEADROOM = ("nemodiff-eval model=runs/demo_cpu/hf analysis=headroom task=[arithmetic,code_completion] "
            "out=runs/demo_cpu/headroom")
BENCH = ("nemodiff-bench model=embedded task=arithmetic num_prompts=4 max_new_tokens=64 runs=3 warmups=1 block_size=8 "
         "batch_sizes=[1,4] out=runs/bench")
BENCH_8B = "nemodiff-bench shape=qwen3-8b batch_sizes=[1,8] out=runs/bench_8b"
BUILD_VARIANT = "scripts/build_embedded_model.py --out nemodiff_train/assets --steps 3000 --seed 0 --threads 2"

# A demo small enough for a test: two steps per stage, a few documents, one evaluation sample.
TINY_DEMO = ("stages.0.steps=2 stages.1.steps=2 stages.0.data.max_documents=20 stages.1.data.max_documents=200 "
             "logging.every=1 logging.val_every=2 logging.val_batches=1 checkpoint.every=2 eval.limit=1 "
             "eval.max_new_tokens=4 eval.sweep.threshold=[] eval.sweep.block_size=[] eval.probe.samples=1 "
             "eval.probe.max_new_tokens=4")
SMALL_EVAL = "limit=1 max_new_tokens=4 sweep.threshold=[]"

# README command -> the command this test runs (the same command; only size knobs added or swapped).
RUN = {
    DEMO: f"bash {ROOT}/scripts/demo.sh $PWD/runs/x {TINY_DEMO}",
    TRAIN: f"{TRAIN} --cfg job",  # composes and validates the config (test below); the demo run trains
    ADAPTER_DEMO: f"{ADAPTER_DEMO} {TINY_DEMO}",  # the adapter demo end to end, two steps per stage
    ADAPTER_FIGURES: f"python {ROOT}/tools/adapter_figures.py --rank 16 --steps 1 --batch 1 --seq-len 16",
    CHECK_BASE: CHECK_BASE.replace("python tools/", f"python {ROOT}/tools/").replace("nemodiff_train/", f"{ROOT}/nemodiff_train/"),
    TORCHRUN: TORCHRUN,
    DATA: DATA,
    EVAL: f"{EVAL} {SMALL_EVAL}",
    EVAL_JSONL: f"{EVAL_JSONL} {SMALL_EVAL}",
    SWEEP: f"{SWEEP} limit=1 max_new_tokens=4",  # the sweep points as written, on one sample
    HEADROOM_X: f"{HEADROOM_X} limit=1",
    EXPORT: EXPORT,
    PUSH_DRY: PUSH_DRY,
    LM_EVAL: LM_EVAL.replace("--limit 20", "--limit 2") + " --gen_kwargs max_gen_toks=4 --device cpu",
    HEADROOM: f"{HEADROOM} limit=1",
    BENCH: BENCH.replace("num_prompts=4", "num_prompts=2").replace("max_new_tokens=64", "max_new_tokens=4")
                .replace("runs=3", "runs=1").replace("batch_sizes=[1,4]", "batch_sizes=[1,2]") + " sol_repeats=1",
    # the shipped base's build command, in its quick form and into a scratch directory (not the package)
    BUILD_VARIANT: f"python {ROOT}/scripts/build_embedded_model.py --quick --steps 2 --seed 0 --threads 1 "
                   "--out $PWD/embedded_variant",
}

# Needs the Hub (the README line says so): command -> its offline counterpart in RUN. The test composes
# and validates the config of training commands offline (--cfg job).
NEEDS_HUB = {
    "torchrun --nproc-per-node=8 -m nemodiff_train.cli.train recipe=nld_3b_sft run.dir=runs/y engine=torch "
    "engine.distributed=fsdp2": TORCHRUN,
    "nemodiff-lm-eval --model nemodiff --model_args pretrained=runs/x/hf,mode=linear_spec --tasks gsm8k": LM_EVAL,
    "nemodiff-export out=exports/x push_to_hub=org/name": PUSH_DRY,
}

# Exercised elsewhere: command -> (file that runs it, a string that file contains, why not here).
ELSEWHERE = {
    "bash scripts/test.sh": ("tests/integration/test_ci_entry.py", '"scripts" / "test.sh"',
                             "the test suite itself; test_ci_entry.py runs it on a few tests"),
    "bash scripts/test.sh --all": (".ci/run", "bash scripts/test.sh --all", "the whole suite; CI (.ci/run) runs it"),
    "pip install torch": (".ci/run", "pip install", "an install from PyPI (needs the network); CI installs the same way"),
    "bash scripts/install_megatron_cpu.sh": (".ci/run", "scripts/install_megatron_cpu.sh",
                                             "installs megatron-core from PyPI (needs the network)"),
    "pytest tests/megatron": ("tests/megatron/conftest.py", "megatron", "the Megatron tier of the suite"),
    "pip install --no-deps -e .": (".ci/run", "pip install", "an install inside NVIDIA's NeMo containers"),
    "tools/bench_train_step.py --random qwen3-1.7b": ("tools/gpu_check.sh", "bench_train_step",
                                                      "an H200 benchmark, run by the GPU check script"),
    "tools/bench_train_step.py --prepared runs/demo_cpu/data/sft --batch 4 --dtype bfloat16 --block-size 8 "
    "--schedule position_dependent": ("tests/integration/test_bench_train_step.py", "--prepared",
                                      "the same options on a small prepared split (the demo run's data is not here)"),
    "python -m nemodiff_train.cli.lm_eval": ("tests/integration/test_lm_eval_packaged_task.py",
                                              "nemodiff_train.cli.lm_eval", "the module behind nemodiff-lm-eval"),
    "nemodiff-export checkpoint=<run dir | checkpoint dir> out=<dir>": (
        "tests/integration/test_readme_commands.py", EXPORT, "a template; its concrete form runs here"),
    "pip install .": ("tests/integration/test_packaging.py", "install", "a non-editable install: the wheel test"),
    "pip wheel . && pip install nemodiff_train-*.whl": ("tests/integration/test_packaging.py", '"wheel"',
                                                        "builds the wheel and installs it into a fresh venv"),
    "nemodiff-train --config-dir <dir> recipe=<name>": ("tests/integration/test_packaging.py", "--config-dir",
                                                        "a template; a user recipe directory is tested there"),
    "pytest -m faults tests/faults": ("pyproject.toml", "faults:", "the faults tier, part of the default pytest run"),
    "nemodiff-data --max-bad-fraction": ("tests/faults/test_hostile_data.py", "max_bad_fraction",
                                         "the option's behaviour is tested in the faults tier"),
    BENCH_8B: ("tools/gpu_decoding_check.sh", "shape=qwen3-8b", "a GPU benchmark (refused on a CPU), run by the "
                                                                 "decoding GPU check script"),
    "bash tools/gpu_decoding_check.sh": ("tools/gpu_decoding_check.sh", "nemodiff_train.cli.bench",
                                         "the decoding GPU check (needs an H100/H200)"),
    "pytest -m gpu tests/gpu": ("tools/gpu_decoding_check.sh", "tests/gpu/test_static_cache_gpu.py",
                                "the CUDA tests; skipped without CUDA"),
    "tools/fault_campaign.py --kills 20 --corruptions 12": ("tools/fault_campaign.py", "--kills",
                                                           "a long randomised campaign (minutes to hours), not a test"),
    "torchrun --nproc-per-node=2 -m nemodiff_train.cli.train recipe=tiny_cpu run.dir=runs/cp engine.cp=2": (
        "tests/faults/test_kill_and_signals.py", '"engine.cp=2"',
        "the same two-process tiny_cpu run is compared with one process and killed and resumed in the faults tier"),
    "tools/fault_campaign.py --only hostile": ("tests/faults/test_hostile_files.py", "metadata_corpus(",
                                               "the family's cases run in the faults tier (tests/faults/hostile.py)"),
}

# Slurm commands (sbatch) are exercised by the Slurm tier on a real local Slurm; here only their scripts'
# existence and syntax are checked.
SLURM_TESTS = ("tests/integration/test_slurm_scripts.py", "tests/integration/test_slurm_train.py")

_COMMAND_WORDS = r"(nemodiff-\w+|python|bash|torchrun|pytest|pip|sbatch|scripts/\S+\.(py|sh)|tools/\S+\.(py|sh))"


def _strip_comment(line: str) -> str:
    return re.split(r"\s+#\s", line, maxsplit=1)[0].strip()


def readme_commands(text: str) -> list[str]:
    """Every ```bash line (comments dropped) and every inline command span with arguments."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = _strip_comment(line)
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        span = " ".join(span.split())
        if " " in span and re.match(_COMMAND_WORDS + r"\s", span):
            commands.append(span)
    return list(dict.fromkeys(commands))


def _is_slurm(command: str) -> bool:
    return "sbatch" in command.split() or "sbatch" in command


def test_every_readme_command_is_accounted_for():
    found = readme_commands(README.read_text())
    known = set(RUN) | set(NEEDS_HUB) | set(ELSEWHERE)
    unaccounted = [c for c in found if c not in known and not _is_slurm(c)]
    assert not unaccounted, f"README commands no test exercises (add them to {__file__}): {unaccounted}"
    stale = sorted(known - set(found))
    assert not stale, f"commands listed here that README.md no longer has: {stale}"


def test_hub_commands_are_marked_and_have_an_offline_counterpart():
    text = README.read_text()
    for command, offline in NEEDS_HUB.items():
        line = next(x for x in text.splitlines() if _strip_comment(" ".join(x.split())) == command)
        assert "needs the Hub" in line, line
        assert offline in RUN


def test_commands_run_elsewhere_are_there():
    for command, (path, needle, why) in ELSEWHERE.items():
        assert needle in (ROOT / path).read_text(), (command, path, why)
    text = README.read_text()
    slurm = [c for c in readme_commands(text) if _is_slurm(c)]
    assert slurm, "the README's Slurm section lost its commands"
    for test in SLURM_TESTS:
        assert (ROOT / test).is_file(), test
    for command in slurm:
        for script in re.findall(r"slurm/\S+\.sh", command):
            res = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
            assert res.returncode == 0, (command, res.stderr)


def _validate_composed(yaml_text: str) -> None:
    """The config a training command composes passes the typed schema (types, unknown keys, values)."""
    from omegaconf import OmegaConf

    from nemodiff_train.config.load import to_config

    to_config(OmegaConf.create(yaml.safe_load(yaml_text)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch working directory with a ``python`` that records ``python -m pip`` calls instead of
    installing into the shared environment (demo.sh installs first)."""
    root = tmp_path_factory.mktemp("readme")
    shim = root / "_bin"
    shim.mkdir()
    (shim / "python").write_text(f'#!/usr/bin/env bash\nif [ "$1" = -m ] && [ "$2" = pip ]; then\n'
                                 f'  echo "$@" >> {root}/_pip_calls; exit 0\nfi\nexec {sys.executable} "$@"\n')
    (shim / "python").chmod(0o755)
    work = root / "work"
    (work / "data").mkdir(parents=True)
    return root, work


def _env(root: Path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT),
                PATH=f"{root / '_bin'}{os.pathsep}{os.environ['PATH']}")


def _sh(command: str, root: Path, cwd: Path) -> subprocess.CompletedProcess:
    res = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=_env(root), cwd=cwd, timeout=3600)  # a guard, not a speed limit
    assert res.returncode == 0, f"{command}\n{res.stdout[-3000:]}\n{res.stderr[-4000:]}"
    return res


def _write_pretrain_files(work: Path) -> None:
    """What the nemodiff-data line reads: data/*.jsonl and code.parquet, enough text for 4096-token rows."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    text = (ROOT / "nemodiff_train" / "data" / "prepare.py").read_text()
    rng = random.Random(0)
    for name in ("a", "b"):
        with open(work / "data" / f"{name}.jsonl", "w") as f:
            for _ in range(12):
                start = rng.randrange(len(text) - 12000)
                f.write(json.dumps({"text": text[start:start + 12000]}) + "\n")
    pq.write_table(pa.table({"text": [text[i:i + 12000] for i in range(0, 8 * 3000, 3000)]}), work / "code.parquet")


@pytest.mark.slow  # every README command, the demo and a torchrun run among them; the checks above stay fast
def test_readme_commands_run_offline(workdir):
    root, work = workdir
    # demo.sh first: it makes runs/x (checkpoints, hf/, eval/) that the other commands use.
    out = _sh(RUN[DEMO], root, work)
    pip = (root / "_pip_calls").read_text().split()
    assert pip == ["-m", "pip", "install", "-q", "torch==2.13.0", "-e", ".[eval]"]  # README: "== pip install ..."
    assert out.stdout.index("installing") < out.stdout.index("stage 1/2 pretrain")
    assert (work / "runs/x/hf/config.json").is_file() and (work / "runs/x/eval_summary.json").is_file()
    assert (work / "runs/x/eval/eval_config.json").is_file()  # the README's run-directory listing
    (work / "runs/demo_cpu").symlink_to(work / "runs/x", target_is_directory=True)

    composed = _sh(RUN[TRAIN], root, work).stdout
    _validate_composed(composed)
    cfg = yaml.safe_load(composed)
    assert cfg["diffusion"]["block_size"] == 32 and cfg["optim"]["lr"] == 1e-5
    for command in NEEDS_HUB:
        if "nemodiff_train.cli.train" in command:  # composes offline; only the model download needs the Hub
            args = command.split("nemodiff_train.cli.train", 1)[1]
            _validate_composed(_sh(f"nemodiff-train {args} --cfg job", root, work).stdout)

    _write_pretrain_files(work)
    (work / "my_rows.jsonl").write_text(json.dumps({"prompt": "def one():\n", "reference": "    return 1\n"}) + "\n")
    for command in (TORCHRUN, DATA, EVAL, EVAL_JSONL, SWEEP, HEADROOM_X, EXPORT, PUSH_DRY, LM_EVAL, HEADROOM,
                    BUILD_VARIANT, BENCH, ADAPTER_DEMO, CHECK_BASE, ADAPTER_FIGURES):
        out = _sh(RUN[command], root, work)
        if command == CHECK_BASE:  # the adapter demo's self-speculation equals generate() of the base
            assert "samples (linear_spec, quadratic_spec) equal transformers generate()" in out.stdout
    assert (work / "runs/demo_adapter/hf/adapter_config.json").is_file()  # the adapter export
    assert (work / "runs/demo_adapter/eval_summary.json").is_file()
    assert (work / "runs/y/hf/config.json").is_file()
    assert json.loads((work / "prepared/meta.json").read_text())["seq_len"] == 4096
    assert {r["task"] for r in json.loads((work / "runs/x/eval_mine/eval.json").read_text())} == {"my_rows"}
    assert json.loads((work / "exports/x/config.json").read_text())["auto_map"]
    assert (work / "runs/demo_cpu/headroom/headroom.json").is_file()
    assert (work / "embedded_variant").is_dir()
    assert {r["mode"] for r in json.loads((work / "runs/bench/bench.json").read_text())["results"]} >= {"ar", "hf_generate"}
