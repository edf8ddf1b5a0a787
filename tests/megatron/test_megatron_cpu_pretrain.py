"""Megatron-Bridge's real ``pretrain()`` on CPU (gloo, world size 1) through ``nemodiff_train.orchestrate.train``.

Runs ``python -m tests.megatron.support.cpu_train`` in subprocesses (its CUDA-emulation patches must not leak into
pytest): a tiny Qwen3 with a tokenizer that lacks the mask token (so the HF init directory is
written: token added, head untied), the tiny_cpu recipe (6 steps, GBS 4 = 2 micro-batches of 2).

1. job A is sent SIGUSR1 after its third step: it saves a checkpoint and exits 0;
2. its first logged loss equals the torch engine's loss on the same global batch and weights
   (global per-token normalisation over micro-batches);
3. job B, the same command, resumes from that checkpoint (step, optimizer, data position), finishes
   and exports an HF directory that loads as a DLM with the recorded settings;
4. that export is the one exporter's (the torch path's): the same file set as a torch export, the whole
   stop set in ``generation_config.json``, and it loads with plain transformers and its remote code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny_models import save_tiny_model
from tests.helpers.tiny_tokenizer import make_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(args: list[str], timeout: int = 400) -> tuple[int, dict, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    log = Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / f"megatron_cpu_{os.getpid()}_{len(args)}.log"
    # output to a file, not pipes: Megatron's checkpoint writer can leave a helper process holding
    # inherited pipes open after the main process exits; its own session is cleaned up below
    with open(log, "w") as fh:
        p = subprocess.Popen([sys.executable, "-m", "tests.megatron.support.cpu_train", *args], cwd=ROOT,
                             env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            p.wait(timeout=timeout)
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the session this test started (helpers it left behind)
            except ProcessLookupError:
                pass
    out = log.read_text(errors="replace")
    log.unlink(missing_ok=True)
    lines = [ln for ln in out.splitlines() if ln.startswith("MEGATRON_CPU_RESULT ")]
    result = json.loads(lines[-1].split(" ", 1)[1]) if lines else {}
    return p.returncode, result, out


def _torch_engine_loss(run_dir: Path, hf_dir: Path, cfg) -> float:
    from nemodiff_train.core.losses import LossWeights
    from nemodiff_train.data.order import GlobalOrder
    from nemodiff_train.data.packed import PackedDataset
    from nemodiff_train.models.hf import load_dlm
    from nemodiff_train.models.step import collate, joint_step

    dlm = load_dlm(hf_dir)
    ds = PackedDataset(run_dir / "data" / "pretrain", "train")
    order = GlobalOrder(len(ds), cfg.run.seed, 0)
    positions = list(range(cfg.stages[0].global_batch_size))
    d = cfg.diffusion
    mb = collate([ds[order.row(p)] for p in positions], positions, seed=cfg.run.seed,
                 mask_token_id=dlm.settings.mask_token_id, schedule=d.schedule, eps=d.eps, block_size=d.block_size,
                 half_life_ratio=d.half_life_ratio)
    with torch.no_grad():
        parts = joint_step(dlm, mb, d.block_size)
    w = LossWeights(d.alpha, d.beta)
    return float(parts.numerator(w) / parts.denominator(w))


def test_pretrain_signal_resume_export(tmp_path):
    from nemodiff_train.config.load import load_saved_config
    from nemodiff_train.models.hf import load_dlm

    model_dir = tmp_path / "base"
    tok = make_tiny_tokenizer(model_dir)
    save_tiny_model(model_dir, "qwen3", vocab_size=len(tok), tie=True, initializer_range=0.1)
    run_dir = tmp_path / "run"
    args = ["recipe=tiny_cpu", "engine=megatron", "engine.device=cpu", f"run.dir={run_dir}",
            f"model.path={model_dir}", "checkpoint.every=100", "export.remote_code=true"]

    rc, res, out = _run(args + ["--sigterm-at-step", "2", "--signal", "SIGUSR1"])
    assert rc == 0 and res.get("exit") == "SystemExit(0)", out[-3000:]
    assert [r["step"] for r in res["steps"]] == [0, 1, 2]
    save = run_dir / "checkpoints" / "0_pretrain"
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    hf_init = run_dir / "megatron" / "hf_init"
    assert (hf_init / "NEMODIFF_INIT_DONE").is_file()  # mask token added, head untied

    cfg = load_saved_config(run_dir / "config.yaml")
    first = res["steps"][0]["lm loss"]
    ref = _torch_engine_loss(run_dir, hf_init, cfg)
    assert abs(first - ref) <= 1e-4 * abs(ref), (first, ref)

    rc, res_b, out = _run(args)
    assert rc == 0, out[-3000:]
    assert "loading distributed checkpoint from" in out and "at iteration 3" in out
    assert [r["step"] for r in res_b["steps"]] == [3, 4, 5]
    # a requeued job of the finished stage does nothing and succeeds
    rc, res_c, out = _run(args)
    assert rc == 0 and res_c["steps"] == [] and res_c["exit"] == "returned", out[-3000:]
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4, 5, 6]
    assert all(k in train[0] for k in ("ar_loss", "diffusion_loss", "lr", "tokens_per_s"))
    assert any("val_ar_loss" in m and "val_diffusion_loss" in m for m in metrics)

    hf = run_dir / "hf"
    conf = json.loads((hf / "config.json").read_text())
    rec = conf["nemodiff"]
    init_rec = json.loads((hf_init / "config.json").read_text())["nemodiff"]
    assert rec["mask_token_id"] == init_rec["mask_token_id"] == len(tok)  # the added token
    assert (rec["train_block_size"], rec["inference_block_size"], rec["attention_pattern"]) == (8, 8, "two_stream")
    assert (rec["alpha"], rec["beta"], rec["recipe"]) == (0.3, 1.0, "tiny_cpu")
    assert conf["tie_word_embeddings"] is False and (hf / "tokenizer.json").is_file()
    trained, init = load_dlm(hf), load_dlm(hf_init)
    assert trained.settings.mask_token_id == len(tok)
    assert trained.hf.get_input_embeddings().weight.shape[0] == len(tok) + 1
    sd_t, sd_i = trained.hf.state_dict(), init.hf.state_dict()
    assert sd_t.keys() == sd_i.keys()
    assert any(not torch.equal(sd_t[k], sd_i[k]) for k in sd_t)  # it trained
    assert not torch.equal(sd_t["lm_head.weight"], sd_t["model.embed_tokens.weight"])  # untied

    # nemodiff-export of the Megatron run directory: the same exporter as a torch run (remote code,
    # model card), the same weights as the engine's own export
    exp = tmp_path / "exported"
    rc, res_e, out = _run(["--export-cli", f"checkpoint={run_dir}", f"out={exp}", "remote_code=true"])
    assert rc == 0 and res_e.get("exit_code") == 0, out[-3000:]
    assert (exp / "modeling_nemodiff.py").is_file() and (exp / "README.md").is_file()
    exp_conf = json.loads((exp / "config.json").read_text())
    assert exp_conf["nemodiff"]["mask_token_id"] == len(tok) and "auto_map" in exp_conf
    sd_e = load_dlm(exp).hf.state_dict()
    assert sd_e.keys() == sd_t.keys() and all(torch.equal(sd_e[k], sd_t[k]) for k in sd_t)
    _check_one_exporter(tmp_path, hf, exp, hf_init)


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def _check_one_exporter(tmp_path: Path, at_end: Path, cli: Path, hf_init: Path) -> None:
    """The Megatron exports (at the end of training, and nemodiff-export of the run) are the torch
    path's: same files as a torch export of the same architecture, same stop set, and plain
    transformers loads them, with the remote code too."""
    from transformers import AutoModelForCausalLM

    from nemodiff_train.export import export_checkpoint

    torch_export = export_checkpoint(hf_init, tmp_path / "torch_export", remote_code=True)
    assert _files(at_end) == _files(cli) == _files(torch_export), (_files(at_end), _files(torch_export))
    assert {"modeling_nemodiff.py", "README.md", "generation_config.json", "model.safetensors"} <= set(_files(at_end))
    gen = [json.loads((d / "generation_config.json").read_text()) for d in (at_end, torch_export)]
    assert gen[0]["eos_token_id"] == gen[1]["eos_token_id"] and len(gen[0]["eos_token_id"]) >= 2  # EOS + <|im_end|>
    assert (at_end / "modeling_nemodiff.py").read_text() == (torch_export / "modeling_nemodiff.py").read_text()
    rec = json.loads((at_end / "config.json").read_text())["nemodiff"]
    assert rec["megatron_checkpoint"] == "iter_0000006" and rec["export_dtype"] == "float32"
    ids = torch.tensor([[5, 9, 13, 17, 21, 25]])
    plain = AutoModelForCausalLM.from_pretrained(str(at_end)).eval()
    remote = AutoModelForCausalLM.from_pretrained(str(at_end), trust_remote_code=True).eval()
    assert type(remote).__name__.startswith("NemoDiff") and not type(plain).__name__.startswith("NemoDiff")
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, remote(ids).logits)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(remote.generate(ids, mode="ar", **kw), plain.generate(ids, **kw))  # the remote AR decoder
