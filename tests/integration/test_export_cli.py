"""The real ``nemodiff-export`` CLI as a subprocess on a tiny run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.unit.test_export_support import make_dlm, make_run_dir, tree

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_CLIsecretTOKEN0987654321"


def _run(args: list[str], cwd: Path, **env_extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT),
               **env_extra)
    return subprocess.run([sys.executable, "-m", "nemodiff_train.cli.export", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_cli")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    dlm = make_dlm(root, "qwen3", tie=True)
    torch.set_num_threads(n)
    return make_run_dir(root / "run", dlm), dlm


def test_export_then_dry_run_push(run, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir, dlm = run
    work = tmp_path / "work"
    work.mkdir()
    res = _run([f"checkpoint={run_dir}", "out=hf", "remote_code=true", "max_shard_size=40KB"], cwd=work)
    assert res.returncode == 0, res.stderr[-4000:]
    out = work / "hf"
    # Hydra neither changed directory nor left outputs/, .hydra/ or log files behind
    assert sorted(p.name for p in work.iterdir()) == ["hf"]
    assert (out / "model.safetensors.index.json").is_file() and (out / "modeling_nemodiff.py").is_file()
    rec = json.loads((out / "config.json").read_text())["nemodiff"]
    assert rec["training_steps"] == 6 and rec["recipe"] == "export_test"
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids).logits - dlm.hf(ids).logits).abs().max().item() <= 1e-5

    # a second export into the now non-empty directory is refused, the export kept
    before = tree(work)
    res = _run([f"checkpoint={run_dir}", "out=hf"], cwd=work)
    assert res.returncode == 1 and "not empty" in res.stderr and "overwrite=true" in res.stderr
    assert tree(work) == before

    # push only, dry run: files, sizes, repo id and visibility listed; nothing sent; token never shown
    res = _run(["out=hf", "push_to_hub=acme/tiny-dlm", "dry_run=true"], cwd=work, HF_TOKEN=TOKEN)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "would upload" in res.stdout and "private repo acme/tiny-dlm" in res.stdout
    for name in ("config.json", "modeling_nemodiff.py", "README.md", "model.safetensors.index.json"):
        assert name in res.stdout
    assert "nothing uploaded" in res.stdout
    assert TOKEN not in res.stdout + res.stderr


def test_corrupt_checkpoint_fails_naming_the_file_and_writes_nothing(run, tmp_path):
    import shutil

    run_dir, _ = run
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "checkpoints" / "step_00000006" / "__0_0.distcp").write_bytes(b"\0" * 64)
    res = _run([f"checkpoint={broken}", "out=hf"], cwd=tmp_path)
    assert res.returncode == 1
    assert "__0_0.distcp is truncated" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob("hf.tmp-*"))


def test_unknown_and_bad_keys_are_named(tmp_path):
    res = _run(["checkpoint=x", "out=y", "+colour=red"], cwd=tmp_path)
    assert res.returncode == 2 and "unknown nemodiff-export key 'colour'" in res.stderr
    res = _run(["checkpoint=x", "out=y", "colour=red"], cwd=tmp_path)  # Hydra's own check
    assert res.returncode != 0 and "colour" in res.stderr
    res = _run(["checkpoint=x", "out=y", "dtype=float16"], cwd=tmp_path)
    assert res.returncode == 2 and "dtype" in res.stderr
    assert list(tmp_path.iterdir()) == []
