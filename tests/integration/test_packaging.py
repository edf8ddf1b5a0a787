"""The package outside its clone: the wheel carries conf/ and recipes/, and the CLIs find them.

``wheel`` builds the wheel from a copy of the checkout's files (what a fresh clone holds: tracked and
untracked-but-not-ignored files), offline (``--no-build-isolation``: setuptools is already here).
The slow test installs it non-editable into a new virtual environment that sees this interpreter's
libraries (torch, transformers, ...) but not the editable install of the clone, and runs the console
scripts from a directory outside the clone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGED = "nemodiff_train/_configs/conf/"

pytestmark = pytest.mark.integration


def _checkout_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout
    return [f for f in out.decode().split("\0") if f and os.path.lexists(REPO / f)]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to know which files a fresh clone holds")
    src = tmp_path_factory.mktemp("clone")
    for name in _checkout_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name, follow_symlinks=False)
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (found,) = dist.glob("nemodiff_train-*.whl")
    return found


def test_wheel_carries_every_config_and_recipe_unchanged(wheel):
    """conf/ (its `recipe` link excepted) and recipes/ are in the wheel byte for byte; recipes as conf/recipe/."""
    expected = {f"{PACKAGED}{p.relative_to(REPO / 'conf')}": p for p in (REPO / "conf").rglob("*")
                if p.is_file() and "recipe" not in p.relative_to(REPO / "conf").parts[:1]}
    expected.update({f"{PACKAGED}recipe/{p.name}": p for p in (REPO / "recipes").glob("*.yaml")})
    with zipfile.ZipFile(wheel) as z:
        packaged = {n for n in z.namelist() if n.startswith(PACKAGED)}
        assert packaged == set(expected), (sorted(packaged ^ set(expected)))
        for name, source in expected.items():
            assert z.read(name) == source.read_bytes(), name
        names = set(z.namelist())
    assert "nemodiff_train/assets/tiny_qwen3/model.safetensors" in names  # the embedded model tiny_cpu trains


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONDONTWRITEBYTECODE="1")
    return env


def _venv_with_wheel(wheel: Path, where: Path) -> Path:
    """A venv holding only the wheel; this interpreter's site-packages are appended as a plain path, so its
    libraries import but its .pth files (the clone's editable-install finder) are not run."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    python = where / "bin" / "python"
    venv_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    # away from the clone and without PYTHONPATH: an editable install's nemodiff_train.egg-info in the
    # clone would otherwise count as "already installed"
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                           str(wheel)], capture_output=True, text=True, timeout=300, cwd=where, env=_clean_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(Path(venv_site).glob("nemodiff_train-*.dist-info")), f"pip installed nothing: {proc.stdout}"
    # after the install: with the outer packages visible, pip would find the clone's editable
    # nemodiff-train of the same version there and install nothing
    Path(venv_site, "_outer_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return where / "bin"


@pytest.mark.slow  # ~1.5 min on 2 CPU cores: a training, an evaluation
def test_installed_wheel_trains_exports_and_evaluates_outside_the_clone(wheel, tmp_path):
    bin_dir = _venv_with_wheel(wheel, tmp_path / "venv")
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = _clean_env()

    def run(*cmd: str, timeout: int = 600) -> str:
        proc = subprocess.run([str(c) for c in cmd], cwd=away, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    where = run(bin_dir / "python", "-c", "import nemodiff_train.config.load as m; print(m.__file__, m.CONF_DIR)")
    module_file, conf_dir = where.split()
    assert Path(module_file).is_relative_to(tmp_path / "venv"), f"the clone shadows the wheel: {module_file}"
    assert Path(conf_dir).is_relative_to(tmp_path / "venv") and not Path(conf_dir).is_relative_to(REPO)

    run(bin_dir / "nemodiff-train", "recipe=tiny_cpu", "run.dir=runs/tiny")
    hf = away / "runs" / "tiny" / "hf"
    assert (hf / "model.safetensors").is_file() and (hf / "README.md").is_file()
    run(bin_dir / "nemodiff-eval", f"model={hf}", "modes=[ar,linear_spec]", "limit=1", "max_new_tokens=4", "out=ev")
    assert (away / "ev" / "eval.json").is_file()
    # the export's card, refreshed with that evaluation, is a Hub model card listing every task x mode
    card = run(bin_dir / "python", "-c", (
        "import sys; from huggingface_hub import ModelCard; from nemodiff_train.export import write_model_card\n"
        "c = ModelCard.load(write_model_card(sys.argv[1], eval_json=sys.argv[2]))\n"
        "print(sorted({(r.dataset_name, r.dataset_config) for r in c.data.eval_results}))"), hf, away / "ev" / "eval.json")
    assert card.strip() == "[('code_completion', 'ar'), ('code_completion', 'linear_spec')]"
    # nemodiff-bench finds its config (conf/apps/bench.yaml) in the package; its runner is tested elsewhere
    assert "prompt_len: 128" in run(bin_dir / "nemodiff-bench", "model=embedded", "--cfg", "job")

    # a user's own recipe directory: <dir>/recipe/<name>.yaml, added with Hydra's --config-dir
    (away / "mine" / "recipe").mkdir(parents=True)
    (away / "mine" / "recipe" / "my_tiny.yaml").write_text(
        "# @package _global_\ndefaults:\n  - /recipe/tiny_cpu\nrecipe: my_tiny\noptim:\n  lr: 2.0e-4\n")
    job = run(bin_dir / "nemodiff-train", "--config-dir", "mine", "recipe=my_tiny", "--cfg", "job")
    assert "recipe: my_tiny" in job and "lr: 0.0002" in job
