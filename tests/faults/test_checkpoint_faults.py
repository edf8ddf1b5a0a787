"""Torn and corrupt checkpoints, full disks, RNG streams and untrusted pickles (checkpointing.py).

The corruptions are applied to real checkpoints of the reference run. Each case must either resume
from the newest checkpoint that verifies, naming what it skipped and why, or stop with an error
naming the files; never start over, never delete what it could not read.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from nemodiff_train import runs
from nemodiff_train.engines.torch import checkpointing as C

from .harness import assert_rows_identical, base_args, launch, metrics, reference, resumed_from

pytestmark = pytest.mark.faults


@pytest.fixture
def run(baseline, tmp_path):
    """A copy of the reference run's checkpoints: step_00000004 and step_00000006."""
    run = tmp_path / "run"
    shutil.copytree(baseline / "checkpoints", run / "checkpoints")
    return run


def _model(run) -> dict:
    return json.loads((run / "checkpoints" / "step_00000006" / runs.MANIFEST).read_text())["model"]


def _truncate(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(f):
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))


CORRUPTIONS = {
    "truncated shard": (lambda c: _truncate(c / "__0_0.distcp"), r"__0_0\.distcp is \d+ bytes, manifest\.json says"),
    "missing shard": (lambda c: (c / "__0_0.distcp").unlink(), r"__0_0\.distcp is missing"),
    "flipped byte in shard": (lambda c: _flip(c / "__0_0.distcp"), r"__0_0\.distcp does not match its SHA-256"),
    "COMPLETE, no trainer_state": (lambda c: (c / runs.TRAINER_STATE).unlink(), r"trainer_state\.json is missing"),
    "COMPLETE, garbled trainer_state": (lambda c: (c / runs.TRAINER_STATE).write_text("{\"step\": 6,"),
                                        r"trainer_state\.json is unreadable"),
    "trainer_state of another step": (lambda c: (c / runs.TRAINER_STATE).write_text('{"step": 8, "tokens": 0}'),
                                      r"says step 8 but the directory is step 6"),
    "no COMPLETE marker": (lambda c: (c / runs.COMPLETE).unlink(), r"no COMPLETE marker"),
    "missing DCP metadata": (lambda c: (c / runs.DCP_METADATA).unlink(), r"\.metadata is missing"),
    "missing RNG state": (lambda c: (c / "rng" / "rank_00000.json").unlink(), r"rank_00000\.json is missing"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_newest_checkpoint_is_skipped_with_its_reason(run, case):
    corrupt, reason = CORRUPTIONS[case]
    newest = run / "checkpoints" / "step_00000006"
    corrupt(newest)
    ckpt, notes = C.select_resume(run, _model(run))
    assert ckpt == run / "checkpoints" / "step_00000004"
    assert len(notes) == 1 and notes[0].startswith(f"skipping checkpoint {newest}: ") and re.search(reason, notes[0])
    assert newest.is_dir()  # never deleted


def test_no_loadable_checkpoint_is_an_error_naming_each(run):
    _truncate(run / "checkpoints" / "step_00000006" / "__0_0.distcp")
    (run / "checkpoints" / "step_00000004" / runs.TRAINER_STATE).write_text("garbage")
    with pytest.raises(C.CheckpointError) as e:
        C.select_resume(run, _model(run))
    msg = str(e.value)
    assert "none can be resumed from" in msg and "refusing to start over" in msg
    assert "step_00000006/__0_0.distcp is" in msg and "step_00000004/trainer_state.json is unreadable" in msg
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]


def test_checkpoint_of_another_model_is_refused(run):
    other = dict(_model(run))
    other["model.embed_tokens.weight"] = [999, 32, "float32"]
    with pytest.raises(C.CheckpointError, match=r"saved from another model: 'model.embed_tokens.weight' is \[321, 32"):
        C.select_resume(run, other)
    renamed = {("x." + k): v for k, v in _model(run).items()}
    with pytest.raises(C.CheckpointError, match="saved from another model"):
        C.select_resume(run, renamed)


def test_non_checkpoint_entries_are_ignored_and_named(run):
    root = run / "checkpoints"
    (root / "notes").mkdir()
    (root / "step_abc").mkdir()
    (root / "README.txt").write_text("hello")
    (root / "step_00000008.tmp").mkdir()  # an unfinished save
    ckpt, notes = C.select_resume(run, _model(run))
    assert ckpt == root / "step_00000006"
    assert any("ignoring" in n and n.split()[1].endswith("notes:") for n in notes)
    assert any("step_abc: not a checkpoint directory" in n for n in notes)
    assert any("step_00000008.tmp: an unfinished save" in n for n in notes)
    assert (root / "notes").is_dir() and (root / "README.txt").is_file()  # not ours: left alone


def test_a_run_without_checkpoints_starts_fresh(tmp_path):
    assert C.select_resume(tmp_path, None) == (None, [])
    (tmp_path / "checkpoints" / "step_00000002.tmp").mkdir(parents=True)  # killed during its first save
    ckpt, notes = C.select_resume(tmp_path, None)
    assert ckpt is None and "unfinished save" in notes[0]


def test_metadata_pickle_cannot_run_code(run, tmp_path):
    """DCP's .metadata is a pickle: only DCP metadata classes may be built from it."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = run / "checkpoints" / "step_00000006"
    (ckpt / runs.DCP_METADATA).write_bytes(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="refusing to import posix.system"):
        C.SafeFileSystemReader(str(ckpt)).read_metadata()
    assert not marker.exists()
    ckpt2 = run / "checkpoints" / "step_00000004"
    assert C.SafeFileSystemReader(str(ckpt2)).read_metadata().state_dict_metadata  # a real one reads fine


# ----------------------------------------------------------------- saving: space, pruning, RNG


def _state(n_floats: int = 1000, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(n_floats, generator=g)}}


def _save(run, step, keep_last=2, **kw):
    return C.save_checkpoint(run, step, _state(**kw), {"step": step, "tokens": step}, keep_last)


def test_keep_last_prunes_only_verified_checkpoints(tmp_path):
    _save(tmp_path, 2, keep_last=1)
    _save(tmp_path, 4, keep_last=1)
    root = tmp_path / "checkpoints"
    assert [p.name for p in sorted(root.iterdir())] == ["step_00000004"]
    _truncate(root / "step_00000004" / "__0_0.distcp")
    _save(tmp_path, 6, keep_last=1)
    assert [p.name for p in sorted(root.iterdir())] == ["step_00000004", "step_00000006"]  # unreadable: kept
    _save(tmp_path, 6, keep_last=1)  # a re-save of a step replaces it only once the new one is complete
    _truncate(root / "step_00000006" / "__0_0.distcp")
    _save(tmp_path, 6, keep_last=1)
    names = sorted(p.name for p in root.iterdir())
    assert names == ["step_00000004", "step_00000006", "step_00000006.unreadable"]
    assert C.verify_checkpoint(root / "step_00000006") is None


def test_injected_enospc_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    first = _save(tmp_path, 2, keep_last=1)
    monkeypatch.setenv("NEMODIFF_FAULT", "checkpoint:1:enospc")
    with pytest.raises(C.CheckpointError) as e:
        _save(tmp_path, 4, keep_last=1)
    msg = str(e.value)
    assert str(tmp_path / "checkpoints") in msg and re.search(r"needs about [\d,]+ bytes", msg)
    assert "the disk filled up" in msg and f"previous checkpoint {first} is intact" in msg
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"]
    assert C.verify_checkpoint(first) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_real_full_disk_is_refused_before_writing(tmp_path):
    mnt = tmp_path / "checkpoints"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        first = _save(tmp_path, 2, keep_last=1, n_floats=150_000)  # 600 kB of 1 MiB
        with pytest.raises(C.CheckpointError) as e:
            _save(tmp_path, 4, keep_last=1, n_floats=150_000)
        msg = str(e.value)
        need = int(re.search(r"needs about ([\d,]+) bytes", msg).group(1).replace(",", ""))
        assert need >= 600_000 and str(mnt) in msg and "nothing was written" in msg
        assert sorted(p.name for p in mnt.iterdir()) == ["step_00000002"] and C.verify_checkpoint(first) is None
        state = {"model": {"w": torch.zeros(150_000)}}
        C.load_checkpoint(first, state)
        assert torch.equal(state["model"]["w"], _state(150_000)["model"]["w"])
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_rng_streams_are_saved_and_restored(tmp_path):
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    torch.rand(3), random.random(), np.random.rand()  # move away from the seeds
    ckpt = _save(tmp_path, 2)
    expected = (torch.rand(5), random.random(), np.random.rand(3))
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    assert C.restore_rng(ckpt, rank=0, world_size=1) is None
    got = (torch.rand(5), random.random(), np.random.rand(3))
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and np.array_equal(got[2], expected[2])
    note = C.restore_rng(ckpt, rank=1, world_size=2)
    assert "no RNG state for rank 1" in note


# --------------------------------------------------------------------- the CLI end to end


def test_cli_resumes_from_older_checkpoint_and_keeps_the_torn_one(assets, baseline, run):
    shutil.copy(baseline / "metrics.jsonl", run / "metrics.jsonl")
    torn = run / "checkpoints" / "step_00000006" / "__0_0.distcp"
    _truncate(torn)
    r = launch(base_args(assets, run, "export.at_end=false"), run)
    assert r.returncode == 0, r.output[-3000:]
    assert f"skipping checkpoint {torn.parent}: {torn} is" in r.output and resumed_from(r) == 4
    assert r.steps == [5, 6] and assert_rows_identical(r.rows, reference(baseline)) == 2
    kept = run / "checkpoints" / "step_00000006.unreadable" / "__0_0.distcp"
    assert kept.is_file() and kept.stat().st_size < (baseline / "checkpoints" / "step_00000006" / "__0_0.distcp").stat().st_size


def test_cli_refuses_a_run_with_only_broken_checkpoints(assets, run):
    (run / "checkpoints" / "step_00000006" / "__0_0.distcp").unlink()
    (run / "checkpoints" / "step_00000004" / runs.TRAINER_STATE).unlink()
    r = launch(base_args(assets, run, "export.at_end=false"), run)
    assert r.returncode == 3, r.output[-3000:]
    assert "nemodiff-train: checkpoint error" in r.output and "Traceback" not in r.output
    assert "step_00000006/__0_0.distcp is missing" in r.output and "step_00000004/trainer_state.json is missing" in r.output
    assert metrics(run) == [] and sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]


def test_cli_full_disk_during_save_then_resume(assets, baseline, tmp_path):
    run = tmp_path / "enospc"
    args = base_args(assets, run, "export.at_end=false")
    r = launch(args, run, fault="checkpoint:2:enospc")  # the step-4 save hits a full disk
    assert r.returncode == 3 and "Traceback" not in r.output, r.output[-3000:]
    assert str(run / "checkpoints") in r.output and re.search(r"needs about [\d,]+ bytes", r.output)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]
    r = launch(args, run)
    assert r.returncode == 0 and resumed_from(r) == 2 and r.steps == [3, 4, 5, 6]
    assert assert_rows_identical(r.rows, reference(baseline)) == 4
