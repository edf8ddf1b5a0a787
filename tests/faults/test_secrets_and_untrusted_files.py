"""Secrets never reach a run directory; no untrusted pickle is ever loaded; exports do not clobber."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .harness import ROOT, SECRETS

pytestmark = pytest.mark.faults


def test_tokens_in_the_environment_never_reach_the_run_directory(baseline):
    """The reference run ran with HF_TOKEN and WANDB_API_KEY set (harness.env); grep every file it wrote."""
    files = [p for p in baseline.rglob("*") if p.is_file()]
    assert any(p.name == "metrics.jsonl" for p in files) and any(p.suffix == ".safetensors" for p in files)
    assert any(p.name == "config.yaml" for p in files) and any(p.name == "README.md" for p in files)  # model card
    for p in files:
        data = p.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in data, f"{name} leaked into {p}"


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
            yield node, f"{node.func.value.id}.{node.func.attr}"


def test_no_unsafe_deserialisation_in_the_package():
    """torch.load only with weights_only=True; no pickle.load(s) of files; every DCP load goes through
    runs/dcp.load_dcp (.metadata: the restricted unpickler; byte entries: weights_only=True)."""
    bad = []
    sources = sorted((ROOT / "nemodiff_train").rglob("*.py")) + sorted((ROOT / "tools").glob("*.py"))
    for path in sources:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, name in _calls(tree):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if name == "torch.load":
                wo = [k for k in node.keywords if k.arg == "weights_only"]
                if not (wo and isinstance(wo[0].value, ast.Constant) and wo[0].value.value is True):
                    bad.append(f"{where}: torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads") or name.endswith("FileSystemReader") and "Safe" not in name:
                bad.append(f"{where}: {name}")
            if name == "dcp.load" and path.relative_to(ROOT).as_posix() != "nemodiff_train/runs/dcp.py":
                bad.append(f"{where}: dcp.load outside runs/dcp.load_dcp (its default planner unpickles byte entries)")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed.checkpoint" \
                    and any(a.name == "FileSystemReader" for a in node.names) \
                    and path.relative_to(ROOT).as_posix() != "nemodiff_train/runs/dcp.py":  # the safe reader's home
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports DCP's pickle-loading FileSystemReader")
    assert not bad, "\n".join(bad)


def test_export_refuses_a_non_empty_directory_unless_told(baseline, tmp_path):
    from nemodiff_train.export import export_checkpoint
    from nemodiff_train.export.errors import ExportError

    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ExportError, match="exists and is not empty; pass overwrite=true"):
        export_checkpoint(baseline, out)
    assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
    export_checkpoint(baseline, tmp_path / "earlier")
    (tmp_path / "earlier" / "stale.txt").write_text("from the earlier export")
    export_checkpoint(baseline, tmp_path / "earlier", overwrite=True)  # an earlier export is replaced
    assert (tmp_path / "earlier" / "config.json").is_file() and not (tmp_path / "earlier" / "stale.txt").exists()


@pytest.mark.parametrize("content", ["plain", "hf_model", "home_like"])
def test_overwrite_refuses_a_directory_that_is_not_an_export(baseline, tmp_path, content):
    """overwrite=true on a directory this toolkit did not write (a user's folder, another model's HF
    directory, a home directory) is refused naming it, and every byte of it stays."""
    import json

    from nemodiff_train.export import export_checkpoint
    from nemodiff_train.export.errors import ExportError

    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    files = {"notes.txt": "keep me", "sub/data.bin": "\x00\x01"}
    if content == "hf_model":  # a Hugging Face model directory without a nemodiff record
        files["config.json"] = json.dumps({"model_type": "qwen3"})
    if content == "home_like":
        files[".bashrc"] = "export PATH=$PATH"
        files["adapter_config.json"] = json.dumps({"peft_type": "LORA"})  # someone else's adapter
    for rel, text in files.items():
        (out / rel).write_text(text)
    before = sorted((p.relative_to(out).as_posix(), p.read_bytes()) for p in out.rglob("*") if p.is_file())
    with pytest.raises(ExportError, match=f"out {out} is not an earlier nemodiff export"):
        export_checkpoint(baseline, out, overwrite=True)
    after = sorted((p.relative_to(out).as_posix(), p.read_bytes()) for p in out.rglob("*") if p.is_file())
    assert after == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_no_absolute_path_of_the_machine_in_any_exported_file(assets, baseline, tmp_path):
    """Both exports of the reference run (the trainer's own hf/ and nemodiff-export with remote code and
    the run's eval table) are grepped, every file, for the run's, the base's and the data's absolute
    paths: the record writes Hub ids, local:<name> or paths relative to the export instead."""
    import json

    from nemodiff_train.export import export_checkpoint

    out = export_checkpoint(baseline, tmp_path / "published", remote_code=True)
    needles = {str(p) for p in (baseline, baseline.resolve(), assets, assets.resolve(), assets / "model",
                                 tmp_path, tmp_path.resolve())}
    checked = 0
    for folder in (baseline / "hf", out):
        for f in (p for p in folder.rglob("*") if p.is_file()):
            data = f.read_bytes()
            checked += 1
            for needle in needles:
                assert needle.encode() not in data, f"{needle} is written in {f}"
    assert checked >= 8
    rec = json.loads((out / "config.json").read_text())["nemodiff"]
    assert rec["base_model"] == "local:model" and rec["data_sources"] == ["local:train.jsonl"]
    assert "local:<file or directory name>" in rec["paths"]
