"""Every command in the headers of ``slurm/*.sh`` and ``recipes/*.yaml`` runs, in its dry-run form.

Slurm lines (``sbatch slurm/x.sh ...``, ``NEMODIFF_DRY_RUN=1 bash slurm/x.sh ...``, chains with
``jid=$(sbatch --parsable ...)``, ``ENGINE=torch sbatch ...``) run the script with
``NEMODIFF_DRY_RUN=1`` in a faked Slurm environment; the trainer (or evaluator) arguments it resolves
are then composed and validated exactly as the CLI would before training (unknown keys, bad values,
torch-only keys under Megatron all fail). Recipe lines (``torchrun ... -m nemodiff_train.cli.train ...``,
``nemodiff-train ...``) get their launcher options parsed by torchrun's own parser and their
overrides composed. Placeholders (``<shared dir>``, ``...``, ``[hydra overrides...]``) become
dummies. A documented command that drifts from the code fails here.
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from nemodiff_train.config.load import compose

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
try:
    from .test_slurm_scripts import fake_slurm_env
except ImportError:
    from test_slurm_scripts import fake_slurm_env

DUMMY = "/tmp/nemodiff-placeholder"


def _header(path: Path) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("set -euo") or (path.suffix == ".yaml" and not line.startswith("#")):
            break
        lines.append(line)
    return lines


_LAUNCH = re.compile(r"^(?:[A-Z_]+=\S*\s+)*(?:sbatch\s|bash slurm/|jid=\$\(sbatch\s)")


def _slurm_commands() -> list[tuple[str, str]]:
    """(where, command) for every documented command in a slurm script's header comment."""
    found = []
    for script in sorted((REPO / "slurm").glob("*.sh")):
        for no, line in enumerate(_header(script), start=1):
            m = re.match(r"^#\s{2,}(.*)$", line)
            if not m or not re.search(r"\bsbatch\b|\bbash slurm/", m.group(1)):
                continue
            text = m.group(1)
            quoted = [q for q in re.findall(r"`([^`]*)`", text) if re.search(r"\bsbatch\b|bash slurm/", q)]
            parts = quoted or [re.split(r"\s{2,}", p.strip())[0] for p in text.split("e.g.")]
            found += [(f"{script.name}:{no}", p.strip()) for p in parts if _LAUNCH.match(p.strip())]
    return found


def _recipe_commands() -> list[tuple[str, str]]:
    found = []
    for recipe in sorted((REPO / "recipes").glob("*.yaml")):
        for no, line in enumerate(_header(recipe), start=1):
            m = re.match(r"^#\s+((?:torchrun|nemodiff-train)\b.*)$", line)
            if m:
                found.append((f"{recipe.name}:{no}", m.group(1)))
    return found


SLURM = _slurm_commands()
RECIPES = _recipe_commands()


def _words(command: str) -> list[str]:
    command = re.sub(r"\[[^\]]*\]", "", command)  # [hydra overrides...]
    command = re.sub(r"<[^>]*>", DUMMY, command)  # <shared dir>
    command = re.sub(r"^jid=\$\((.*)\)$", r"\1", command.strip())  # a chain's first job
    command = command.replace("$jid", "4242")
    return [w for w in shlex.split(command) if w != "..."]


@functools.lru_cache(maxsize=None)
def _compose(args: tuple[str, ...]):
    return compose(list(args))


def _split_at_module(cmd: list[str], module: str) -> tuple[list[str], list[str]]:
    i = max(j for j, w in enumerate(cmd) if w == "-m" and j + 1 < len(cmd) and cmd[j + 1] == module)
    return cmd[:i], cmd[i + 2:]


def test_every_script_and_recipe_documents_a_command():
    scripts = {w.split(":")[0] for w, _ in SLURM}
    assert {p.name for p in (REPO / "slurm").glob("*.sh")} - {"_launch.sh"} <= scripts
    recipes = {w.split(":")[0] for w, _ in RECIPES}
    assert {p.name for p in (REPO / "recipes").glob("*.yaml")} == recipes


@pytest.mark.parametrize("where, command", SLURM, ids=[w for w, _ in SLURM])
def test_slurm_header_command(where, command, tmp_path):
    words = _words(command)
    env = fake_slurm_env(RUNS_ROOT=tmp_path / "runs")
    while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value prefixes
        key, _, value = words.pop(0).partition("=")
        env[key] = DUMMY if value in ("", "...") and key in ("MODEL", "OUT") else value
    assert words and words[0] in ("sbatch", "bash"), f"{where}: not a launch command: {command!r}"
    launcher = words.pop(0)
    while words and words[0].startswith("-"):  # sbatch options; --export=ALL,CHAIN_ID=... sets variables
        opt = words.pop(0)
        if opt.startswith("--export="):
            for item in opt.split("=", 1)[1].split(",")[1:]:
                k, _, v = item.partition("=")
                env[k] = v
        assert launcher == "sbatch", f"{where}: option {opt} before the script"
    script, args = words[0], words[1:]
    assert re.fullmatch(r"slurm/\w+\.sh", script), f"{where}: {script!r}"
    proc = subprocess.run(["bash", script, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert proc.returncode == 0, f"{where}: {command!r} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    line = next(x for x in proc.stdout.splitlines() if "command: " in x)
    cmd = shlex.split(line.split("command: ", 1)[1])
    if script == "slurm/eval.sh":
        if env["MODEL"].startswith("runs/"):  # a run's export: the trainer writes <run.dir>/hf (export.at_end)
            assert env["MODEL"].endswith("/hf"), f"{where}: MODEL={env['MODEL']} is not a run's export <run.dir>/hf"
        _, ev_args = _split_at_module(cmd, "nemodiff_train.cli.evaluate")
        from hydra import compose as hydra_compose, initialize_config_dir

        from nemodiff_train.cli.evaluate import to_eval_config
        from nemodiff_train.config.load import APPS_CONF_DIR

        with initialize_config_dir(config_dir=str(APPS_CONF_DIR), version_base=None):
            to_eval_config(hydra_compose(config_name="evaluate", overrides=ev_args))
        return
    _, train_args = _split_at_module(cmd, "nemodiff_train.cli.train")
    cfg = _compose(tuple(train_args))  # raises ConfigError naming the key on any drift
    if env.get("ENGINE"):
        assert cfg.engine.name == env["ENGINE"], f"{where}: ENGINE={env['ENGINE']} ran engine {cfg.engine.name}"


@pytest.mark.parametrize("where, command", RECIPES, ids=[w for w, _ in RECIPES])
def test_recipe_header_command(where, command):
    words = _words(command)
    recipe = Path(where.split(":")[0]).stem
    if words[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        launcher, train_args = _split_at_module(words, "nemodiff_train.cli.train")
        get_args_parser().parse_args([*launcher[1:], "-m", "nemodiff_train.cli.train"])  # torchrun's own parser
    else:
        assert words[0] == "nemodiff-train"
        assert 'nemodiff-train = "nemodiff_train.cli.train:main"' in (REPO / "pyproject.toml").read_text()
        train_args = words[1:]
    assert f"recipe={recipe}" in train_args, f"{where}: the header runs another recipe: {command!r}"
    _compose(tuple(train_args))
