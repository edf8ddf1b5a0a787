"""The one atomic-directory helper both exports write through (nemodiff_train/export/output_dir.py)."""

import json

import pytest

from nemodiff_train.export import ExportError
from nemodiff_train.export.output_dir import atomic_directory, check_replaceable


def _earlier_export(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"nemodiff": {"alpha": 1.0}}))
    (path / "model.safetensors").write_text("old")


def _needs(name):
    def verify(folder):
        if not (folder / name).is_file():
            raise ExportError(f"{name} not written")
    return verify


def test_commit_replaces_an_earlier_export_and_leaves_nothing_beside_it(tmp_path):
    out = tmp_path / "hf"
    _earlier_export(out)
    check_replaceable(out, overwrite=True)
    with atomic_directory(out, verify=_needs("model.safetensors")) as tmp:
        assert tmp.parent == out.parent and tmp != out
        (tmp / "model.safetensors").write_text("new")
    assert (out / "model.safetensors").read_text() == "new" and not (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parametrize("failure", ["verify", "exception", "interrupt"])
def test_a_failure_leaves_out_untouched_and_removes_what_it_created(tmp_path, failure):
    out = tmp_path / "hf"
    _earlier_export(out)
    new_parent = tmp_path / "a" / "b" / "hf"
    for target in (out, new_parent):
        error = {"verify": ExportError, "exception": OSError, "interrupt": KeyboardInterrupt}[failure]
        with pytest.raises(error):
            with atomic_directory(target, verify=_needs("model.safetensors")) as tmp:
                (tmp / "config.json").write_text("{}")
                if failure == "exception":
                    raise OSError("disk full")
                if failure == "interrupt":
                    raise KeyboardInterrupt
    assert (out / "model.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no tmp, no a/b left behind


def test_check_replaceable_refuses_what_is_not_ours(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a directory"):
        check_replaceable(tmp_path / "file", overwrite=True)
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty; pass overwrite=true"):
        check_replaceable(home, overwrite=False)
    with pytest.raises(ExportError, match="not an earlier nemodiff export"):
        check_replaceable(home, overwrite=True)
    run = tmp_path / "run"
    _earlier_export(run)
    with pytest.raises(ExportError, match="would replace the checkpoint"):
        check_replaceable(run, overwrite=True, protect=[run / "checkpoints" / "step_2"])
    check_replaceable(tmp_path / "new", overwrite=False)  # a new directory is fine
    assert (home / "notes.txt").read_text() == "mine"
