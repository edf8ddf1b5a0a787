"""The real ``nemodiff-train`` CLI on a tiny model: runs, torchrun parity, exact resume, signals, W&B."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.tiny_run import make_run_assets, tiny_cpu_args

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_run_assets(tmp_path_factory.mktemp("train_assets"))


def _args(assets: Path, run_dir: Path, *extra: str) -> list[str]:
    return tiny_cpu_args(assets, run_dir, "export.at_end=false", *extra)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return env


def _train(args, torchrun: int = 0, check=True, **kw):
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={torchrun}", "--standalone",
               "-m", "nemodiff_train.cli.train", *args]
    else:
        cmd = [sys.executable, "-m", "nemodiff_train.cli.train", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, **kw)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train_losses(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in _metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def baseline(assets, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "baseline"
    _train(_args(assets, run_dir))
    return run_dir


def test_run_directory_contract(baseline):
    assert (baseline / "config.yaml").is_file()
    assert (baseline / "hf_base" / "config.json").is_file()
    ckpts = sorted((baseline / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step_00000004", "step_00000006"]  # keep_last=2 of every=2
    rows = _metrics(baseline)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    for r in train_rows:
        for key in ("loss", "ar_loss", "diffusion_loss", "lr", "tokens_per_s"):
            assert isinstance(r[key], float), key
    val = [r for r in rows if "val_ar_loss" in r]
    assert val and all("val_diffusion_loss" in r for r in val)
    assert val[0]["step"] == 0  # the base model's validation, before any step


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_torchrun_two_processes_match_one(assets, baseline, tmp_path, strategy):
    run_dir = tmp_path / strategy
    _train(_args(assets, run_dir, f"engine.distributed={strategy}"), torchrun=2)
    one, two = _train_losses(baseline), _train_losses(run_dir)
    assert one.keys() == two.keys()
    for step in one:
        for key in ("loss", "ar_loss", "diffusion_loss"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-4, abs=1e-5), (step, key)
        assert two[step]["masked_tokens"] == one[step]["masked_tokens"]


def test_killed_run_resumes_exactly(assets, baseline, tmp_path):
    """SIGKILL after the step-2 checkpoint, then resume: steps 3.. log the same losses as uninterrupted."""
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "nemodiff_train.cli.train", *_args(assets, run_dir, "checkpoint.keep_last=5")]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "checkpoints" / "step_00000002" / "COMPLETE").exists():
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert (run_dir / "checkpoints" / "step_00000002" / "COMPLETE").exists()
    killed_at = max(r["step"] for r in _metrics(run_dir) if "loss" in r)
    assert killed_at < 6, "the run finished before it could be killed; nothing was tested"
    out = _train(_args(assets, run_dir, "checkpoint.keep_last=5"))
    assert "resuming from" in out.stdout + out.stderr
    resumed = [r for r in _metrics(run_dir) if "loss" in r]
    ref = _train_losses(baseline)
    last_ckpt = max(int(p.name[5:]) for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert last_ckpt == 6
    after = [r for r in resumed if r["step"] > 2][-(6 - 2):]  # the records the resumed process wrote
    assert [r["step"] for r in after] == [3, 4, 5, 6]
    for r in after:
        assert r["loss"] == pytest.approx(ref[r["step"]]["loss"], rel=1e-6, abs=1e-7), r["step"]


def test_sigterm_saves_checkpoint_and_exits_cleanly(assets, tmp_path):
    run_dir = tmp_path / "term"
    cmd = [sys.executable, "-m", "nemodiff_train.cli.train",
           *_args(assets, run_dir, "stages.0.steps=200", "checkpoint.every=1000")]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and any("loss" in r for r in _metrics(run_dir)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    ckpts = [p for p in (run_dir / "checkpoints").iterdir() if (p / "COMPLETE").exists()]
    assert len(ckpts) == 1
    step = json.loads((ckpts[0] / "trainer_state.json").read_text())["step"]
    assert 1 <= step < 200
    assert any(r.get("event") == "preempted" for r in _metrics(run_dir))


def test_misspelt_key_fails_with_its_name(assets, tmp_path):
    out = _train(_args(assets, tmp_path / "bad", "optim.learning_rate=1e-3"), check=False)
    assert out.returncode != 0
    assert "optim.learning_rate" in out.stderr
    out = _train(_args(assets, tmp_path / "bad2", "diffusion.block_size=-4"), check=False)
    assert out.returncode != 0 and "diffusion.block_size" in out.stderr
    assert not (tmp_path / "bad").exists()


def test_wandb_offline_files_hold_the_metrics(assets, tmp_path):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "wb"
    _train(_args(assets, run_dir, "logging.wandb.project=nemodiff-test", "logging.wandb.mode=offline"))
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    from wandb.proto import wandb_internal_pb2

    logged = {}
    for data in _wandb_records(files[0]):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            logged[items.get("_step")] = items
    ref = _train_losses(run_dir)
    for step, r in ref.items():
        assert logged[step]["loss"] == pytest.approx(r["loss"], rel=1e-6)
        assert "ar_loss" in logged[step] and "diffusion_loss" in logged[step]


def _wandb_records(path: Path):
    """Records of a ``.wandb`` file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose records
    carry (crc32: 4, length: 2, type: 1) headers; types FULL=1, FIRST=2, MIDDLE=3, LAST=4.
    (wandb >= 0.2x no longer ships a Python reader for its own files.)"""
    import struct

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", "not a W&B transaction log"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data = raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            yield data
        elif kind == 2:
            pending = data
        elif kind == 3:
            pending += data
        elif kind == 4:
            yield pending + data
