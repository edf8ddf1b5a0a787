"""kill -9 and SIGTERM/SIGUSR1 at deterministic moments of every phase; resume is bit for bit.

Each test is a chain of launches of the real CLI on one run directory, each launch with one fault
(``NEMODIFF_FAULT``, see ``nemodiff_train/faults.py``). After every launch the test checks where
the next one must resume, and that the rows it compares were written by a launch *after* a fault
(re-run steps), so no comparison is vacuous.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from nemodiff_train.engines.torch.checkpointing import verify_checkpoint

from .harness import (assert_rows_identical, base_args, check_ok, launch, metrics, reference, resumed_from,
                      train_rows)

# slow: dozens of killed and resumed runs; tests/faults/test_checkpoint_faults.py keeps a resume from a
# torn checkpoint in the default selection (scripts/test.sh; --all runs this)
pytestmark = [pytest.mark.faults, pytest.mark.slow]

KILLED = -9  # subprocess return code of a process that died of SIGKILL


def _complete(run) -> list[int]:
    root = run / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.glob("step_????????") if verify_checkpoint(p) is None) \
        if root.is_dir() else []


def _same_weights(a, b) -> None:
    wa = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(f).items()}
    wb = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_kill9_in_every_phase_resumes_bit_for_bit(assets, baseline, tmp_path):
    ref = reference(baseline)
    run = tmp_path / "chain"
    args = base_args(assets, run, "checkpoint.keep_last=1")

    r = launch(args, run, fault="data:1")  # after the train source is tokenized, before val
    assert r.returncode == KILLED, r.output[-2000:]
    assert r.steps == [] and not (run / "data" / "pretrain" / "meta.json").exists()

    r = launch(args, run, fault="step:3")  # between backward and update of step 3
    assert r.returncode == KILLED and resumed_from(r) is None and r.steps == [1, 2], r.output[-2000:]
    assert _complete(run) == [2]
    # for the world-size change below (the checkpoints only: prepared data records its tokenizer's path)
    shutil.copytree(run / "checkpoints", tmp_path / "one_to_two" / "checkpoints")

    r = launch(args, run, fault="checkpoint:1")  # the step-4 shards are written, COMPLETE is not
    assert r.returncode == KILLED and resumed_from(r) == 2 and r.steps == [3, 4], r.output[-2000:]
    assert (run / "checkpoints" / "step_00000004.tmp").is_dir() and _complete(run) == [2]

    r = launch(args, run, fault="prune:1")  # step 4 is in place; keep_last=1 has not removed step 2 yet
    assert r.returncode == KILLED and resumed_from(r) == 2 and r.steps == [3, 4], r.output[-2000:]
    assert "step_00000004.tmp: an unfinished save" in r.output
    assert _complete(run) == [2, 4]  # the old one is deleted only after the new one is complete

    r = launch(args, run, fault="export:1")  # weights half-exported
    assert r.returncode == KILLED and resumed_from(r) == 4 and r.steps == [5, 6], r.output[-2000:]
    assert _complete(run) == [6] and not (run / "hf" / "config.json").exists()

    r = check_ok(launch(args, run))
    assert resumed_from(r) == 6 and r.steps == []
    _same_weights(run / "hf", baseline / "hf")

    rows = train_rows(metrics(run))
    assert sorted(r["step"] for r in rows) == [1, 2, 3, 3, 4, 4, 5, 6]  # 3 and 4 re-run after each kill
    assert assert_rows_identical(rows, ref) == 8

    # world size 1 -> 2 through DCP resharding: the same global data order and noise, so the losses
    # match the one-process run up to the order of the float reductions
    two = tmp_path / "one_to_two"
    r = check_ok(launch(base_args(assets, two, "export.at_end=false"), two, nproc=2))
    assert resumed_from(r) == 2 and r.steps == [3, 4, 5, 6]
    assert "world size 1 -> 2: rank 0 took rank 0's RNG streams" in r.output
    assert_rows_identical(r.rows, ref, exact=False)


def test_sigterm_and_sigusr1_in_every_phase(assets, baseline, tmp_path):
    ref = reference(baseline)
    run = tmp_path / "signals"
    args = base_args(assets, run)

    r = check_ok(launch(args, run, fault="data:1:term"))  # preempted while preparing data
    assert r.steps == [1] and any(x.get("event") == "preempted" for x in r.rows)
    assert _complete(run) == [1]

    r = check_ok(launch(args, run, fault="step:1:usr1"))  # mid-step 2: the step finishes, then saves
    assert resumed_from(r) == 1 and r.steps == [2] and _complete(run) == [1, 2]

    r = check_ok(launch(args, run, fault="checkpoint:1:term"))  # while writing step 4: it completes
    assert resumed_from(r) == 2 and r.steps == [3, 4, 5] and _complete(run) == [4, 5]

    r = check_ok(launch(args, run, fault="export:1:usr1"))  # while exporting: the export completes
    assert resumed_from(r) == 5 and r.steps == [6] and (run / "hf" / "config.json").is_file()
    _same_weights(run / "hf", baseline / "hf")

    rows = train_rows(metrics(run))
    assert [x["step"] for x in rows] == [1, 2, 3, 4, 5, 6]
    assert assert_rows_identical(rows, ref) == 6


@pytest.mark.parametrize("strategy,fault", [("ddp", "step:3@1"), ("fsdp2", "checkpoint:2@0")])
def test_torchrun_two_processes_kill9_resumes_bit_for_bit(assets, tmp_path, strategy, fault):
    """A kill of one rank tears the job down (torchrun); the restarted job matches an uninterrupted one."""
    ref_run = tmp_path / "reference"
    extra = (f"engine.distributed={strategy}", "export.at_end=false")
    check_ok(launch(base_args(assets, ref_run, *extra), ref_run, nproc=2))
    ref = reference(ref_run)

    run = tmp_path / "killed"
    r = launch(base_args(assets, run, *extra), run, nproc=2, fault=fault)
    assert r.returncode != 0
    last = 2  # ddp: step:3 dies before the step-4 save; fsdp2: checkpoint:2 is the step-4 save
    assert _complete(run) == [last] and max(r.steps) < 6
    if strategy == "fsdp2":
        assert r.steps == [1, 2, 3, 4] and (run / "checkpoints" / "step_00000004.tmp").is_dir()
    else:
        assert r.steps == [1, 2]
        shutil.copytree(run / "checkpoints", tmp_path / "two_to_one" / "checkpoints")

    r = check_ok(launch(base_args(assets, run, *extra), run, nproc=2))
    assert resumed_from(r) == last and r.steps == list(range(last + 1, 7))
    assert assert_rows_identical(r.rows, ref) == 6 - last

    if strategy == "ddp":  # world size 2 -> 1 through DCP resharding
        one = tmp_path / "two_to_one"
        r = check_ok(launch(base_args(assets, one, "export.at_end=false"), one))
        assert resumed_from(r) == 2 and r.steps == [3, 4, 5, 6] and "world size 2 -> 1" in r.output
        assert_rows_identical(r.rows, ref, exact=False)


def test_context_parallel_kill9_resumes_bit_for_bit(assets, baseline, tmp_path):
    """engine.cp=2 under torchrun (one data-parallel group of two context-parallel ranks): an
    uninterrupted run equals the one-process baseline (losses, masked-token counts, gradient norms),
    a kill of rank 1 mid-step resumes bit for bit, and its checkpoint resumes in one process without CP."""
    extra = ("engine.cp=2", "export.at_end=false")
    ref_run = tmp_path / "reference"
    r = check_ok(launch(base_args(assets, ref_run, *extra), ref_run, nproc=2))
    assert "engine.cp=2: 1 data-parallel group(s) x 2 context-parallel ranks" in r.output
    ref = reference(ref_run)
    assert assert_rows_identical(list(ref.values()), reference(baseline), exact=False) == 6
    val = {x["step"]: x["val_loss"] for x in metrics(ref_run) if "val_loss" in x}
    val_one = {x["step"]: x["val_loss"] for x in metrics(baseline) if "val_loss" in x}
    assert sorted(val) == sorted(val_one) and len(val) >= 2, (val, val_one)
    for step in val:  # validation splits rows over data ranks and positions over CP ranks
        assert val[step] == pytest.approx(val_one[step], rel=1e-5), (step, val, val_one)

    run = tmp_path / "killed"
    r = launch(base_args(assets, run, *extra), run, nproc=2, fault="step:3@1")
    assert r.returncode != 0 and r.steps == [1, 2] and _complete(run) == [2], r.output[-2000:]
    shutil.copytree(run / "checkpoints", tmp_path / "cp_to_one" / "checkpoints")
    r = check_ok(launch(base_args(assets, run, *extra), run, nproc=2))
    assert resumed_from(r) == 2 and r.steps == [3, 4, 5, 6]
    assert assert_rows_identical(r.rows, ref) == 4

    # the CP checkpoint resumed by one process without CP (DCP reshards; parameters are whole on every CP rank)
    one = tmp_path / "cp_to_one"
    r = check_ok(launch(base_args(assets, one, "export.at_end=false"), one))
    assert resumed_from(r) == 2 and r.steps == [3, 4, 5, 6] and "world size 2 -> 1" in r.output
    assert_rows_identical(r.rows, ref, exact=False)
