"""The Megatron engine's own ``build_job``/``launch`` on one device, measured: ``tiny`` and ``mfu``.

    python -m tests.megatron.support.engine_check tiny --work DIR --out result.json [--cpu-emulate]
    python -m tests.megatron.support.engine_check mfu --work DIR --out result.json [--cpu-emulate]

Each part is one job of the real engine (:func:`nemodiff_train.engines.megatron.train.build_job`,
then :func:`~nemodiff_train.engines.megatron.train.launch`) with a recording callback; it writes its
measurements to ``--out`` and judges nothing: the tests that run it assert
(tests/gpu/test_megatron_gpu.py on CUDA, tests/megatron/test_megatron_engine_check_cpu.py on CPU).
One part per process: Megatron's global state allows one ``pretrain`` per process, and the CPU
emulation's torch patches must not leak into pytest.

* ``tiny``: a random 4-layer Qwen3 (d256, untied) with the embedded tokenizer (which has the mask
  token, so stage 0 loads this directory's weights as they are) on the embedded arithmetic data; the
  first loss is compared with the torch engine's (``models.step.joint_step``, fp32) on the same
  global batch and weights.
* ``mfu``: ``engine.init_from=random`` on a config-only ~1.2B Llama directory (a small one on CPU) at
  2L = 4096 tokens; MFU = model FLOPs (6·N·tokens + attention over the pattern's allowed pairs) /
  (median step time × bf16 dense peak).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _copy_tokenizer(out: Path) -> int:
    """The embedded model's tokenizer files → ``out``; returns its vocabulary size."""
    from transformers import AutoTokenizer

    from nemodiff_train.assets.resolve import resolve_model_path

    src = resolve_model_path("embedded")
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    return len(AutoTokenizer.from_pretrained(str(out)))


def _overrides(run_dir: Path, model_dir: Path, *, seq_len: int, steps: int, gbs: int, mbs: int, lr: float,
               block: int, max_documents: int, cpu: bool, attention: str) -> list[str]:
    ov = ["recipe=tiny_cpu", "engine=megatron", f"run.dir={run_dir}", f"model.path={model_dir}",
          f"stages.0.steps={steps}", f"stages.0.global_batch_size={gbs}", f"stages.0.micro_batch_size={mbs}",
          f"stages.0.lr={lr}", f"optim.lr={lr}", f"optim.min_lr={lr / 10}", f"stages.0.data.seq_len={seq_len}",
          "stages.0.data.sources=[embedded:arithmetic_pretrain_train.jsonl.gz]",
          "stages.0.data.val_sources=[embedded:arithmetic_pretrain_val.jsonl.gz]",
          f"stages.0.data.max_documents={max_documents}",
          f"diffusion.block_size={block}", "diffusion.inference_block_size=16", "schedule.warmup_fraction=0.1",
          "checkpoint.every=100000", "logging.every=1", "logging.val_every=0", "export.at_end=false",
          f"engine.megatron_attention={attention}"]
    return ov + (["engine.device=cpu", "engine.precision=fp32"] if cpu else [])


def _recorder(use_cuda: bool):
    """A ``pretrain`` callback: per-iteration wall time (CUDA-synchronised), losses, skipped flag."""
    import torch
    from megatron.bridge.training.callbacks import Callback

    class Recorder(Callback):
        def __init__(self):
            self.rows, self.t = [], None

        def _sync(self):
            if use_cuda:
                torch.cuda.synchronize()

        def on_train_start(self, context):
            if use_cuda:
                torch.cuda.reset_peak_memory_stats()

        def on_train_step_start(self, context):
            self._sync()
            self.t = time.perf_counter()

        def on_train_step_end(self, context):
            self._sync()
            vals = {k: float(v) for k, v in (context.loss_dict or {}).items()}
            self.rows.append({"ms": (time.perf_counter() - self.t) * 1000, **vals, "skipped": bool(context.skipped_iter)})
            print(f"ITER {len(self.rows)} {json.dumps(self.rows[-1])}", flush=True)

    return Recorder()


def _for_timing(job) -> None:
    """No checkpoint writes, no TensorBoard, no data workers: the job measures steps only."""
    c = job.container
    c.checkpoint.save = None
    c.checkpoint.load = None
    c.logger.tensorboard_dir = None
    c.dataset.num_workers = 0
    c.dist.disable_jit_fuser = True


def torch_engine_loss(cfg, run_dir: Path, hf_dir: Path, device: str = "cpu") -> float:
    """The torch engine's joint loss (fp32, no grad) on stage 0's first global batch, weights of ``hf_dir``."""
    import torch

    from nemodiff_train.core.losses import LossWeights
    from nemodiff_train.data.order import GlobalOrder
    from nemodiff_train.data.packed import PackedDataset
    from nemodiff_train.data.stage import stage_dir
    from nemodiff_train.models.hf import load_dlm
    from nemodiff_train.models.step import collate, joint_step

    dlm = load_dlm(hf_dir, device=device, attn_implementation="sdpa")
    ds = PackedDataset(stage_dir(cfg, 0, run_dir), "train")
    order = GlobalOrder(len(ds), cfg.run.seed, 0)
    positions = list(range(cfg.stages[0].global_batch_size))
    d = cfg.diffusion
    mb = collate([ds[order.row(p)] for p in positions], positions, seed=cfg.run.seed,
                 mask_token_id=dlm.settings.mask_token_id, schedule=d.schedule, eps=d.eps, block_size=d.block_size,
                 half_life_ratio=d.half_life_ratio).to(device)
    with torch.no_grad():
        parts = joint_step(dlm, mb, d.block_size)
    w = LossWeights(d.alpha, d.beta)
    loss = float(parts.numerator(w) / parts.denominator(w))
    del dlm, parts
    if device == "cuda":
        torch.cuda.empty_cache()
    return loss


def _train(job, cpu: bool) -> tuple[list[dict], float, float, str]:
    """``launch(job)`` with the recorder; returns (rows, wall seconds, peak GiB, attention used)."""
    import torch

    from nemodiff_train.engines.megatron import attention as att
    from nemodiff_train.engines.megatron.train import launch

    use_cuda = torch.cuda.is_available() and not cpu
    rec = _recorder(use_cuda)
    job.callbacks.append(rec)
    _for_timing(job)
    t0 = time.time()
    launch(job)
    wall = time.time() - t0
    mem = torch.cuda.max_memory_allocated() / 2**30 if use_cuda else 0.0
    if not use_cuda:
        attention = "sdpa-cpu"
    elif att._flex_failed:
        attention = "sdpa-fallback"
    else:
        attention = "flex" if job.cfg.engine.megatron_attention in ("auto", "flex") else "sdpa"
    return rec.rows, wall, mem, attention


def _cpu_emulation(cpu: bool) -> None:
    if cpu:  # after the torch-engine reference: the patches perturb HF modeling numerics slightly
        from . import cpu_emulation

        cpu_emulation.apply()


def part_tiny(args) -> dict:
    import torch

    from nemodiff_train.config.load import compose
    from nemodiff_train.engines.megatron.train import build_job
    from tests.helpers.tiny_models import save_tiny_model

    cpu, work = args.cpu_emulate, Path(args.work)
    base = work / "base"
    vocab = _copy_tokenizer(base)
    save_tiny_model(base, "qwen3", vocab_size=vocab, tie=False, hidden_size=256, intermediate_size=768,
                    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                    initializer_range=0.02)
    L, gbs, mbs = (64, 8, 4) if cpu else (256, 8, 4)
    cfg = compose(_overrides(work / "run", base, seq_len=L, steps=args.iters, gbs=gbs, mbs=mbs, lr=1e-3, block=16,
                             max_documents=400 if cpu else 2000, cpu=cpu, attention=args.attention))
    job = build_job(cfg)
    dev = "cuda" if (torch.cuda.is_available() and not cpu) else "cpu"
    ref = torch_engine_loss(cfg, job.run_dir, job.hf_dir, dev)  # before Megatron touches global state
    _cpu_emulation(cpu)
    rows, wall, mem, attention = _train(job, cpu)
    losses = [r.get("lm loss", math.nan) for r in rows]
    steady = [r["ms"] for r in rows[2:]] or [r["ms"] for r in rows]
    k = max(1, min(5, len(losses) // 3))  # the loss is noisy (one t per row): compare window means
    return {"iters": len(rows), "losses": [round(x, 5) for x in losses],
            "ar_loss": [round(r.get("ar_loss", math.nan), 5) for r in rows],
            "diffusion_loss": [round(r.get("diffusion_loss", math.nan), 5) for r in rows],
            "skipped": sum(r["skipped"] for r in rows), "loss_window": k,
            "loss_first_window": sum(losses[:k]) / k, "loss_last_window": sum(losses[-k:]) / k,
            "first_loss": losses[0] if losses else None, "torch_engine_loss": ref,
            "first_loss_rel_diff": abs(losses[0] - ref) / abs(ref) if losses else None,
            "starts_from_the_base_weights": job.container.checkpoint.pretrained_checkpoint == str(base),
            "pretrained_checkpoint": job.container.checkpoint.pretrained_checkpoint,
            "median_iter_ms": round(statistics.median(steady), 1) if steady else None,
            "pretrain_wall_s": round(wall, 1), "peak_mem_gib": round(mem, 2), "attention": attention,
            "model": "qwen3 4L d256 8q/4kv heads", "vocab": vocab, "L": L, "gbs": gbs, "mbs": mbs,
            "precision": "fp32 (cpu)" if cpu else "bf16_mixed"}


def _mask_density(L: int, block: int) -> float:
    from nemodiff_train.core.masks import SequenceLayout, dense_mask

    return float(dense_mask("two_stream", SequenceLayout(L, block), 1).float().mean())


def part_mfu(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nemodiff_train.config.load import compose
    from nemodiff_train.engines.megatron.train import build_job

    cpu, work = args.cpu_emulate, Path(args.work)
    if cpu:  # the check's own logic on CPU, not a measurement
        shape = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=4224)
        L, mbs = 128, 2
    else:  # ~1.2B: 16 x (4·2048² attn-ish + 3·2048·8192 MLP) + 2 x 32000·2048 embeddings/head
        shape = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
                     num_key_value_heads=8, vocab_size=32000)
        L, mbs = 2048, 2
    conf = LlamaConfig(**shape, max_position_embeddings=8192, tie_word_embeddings=False, rope_theta=500000.0,
                       architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        meta = LlamaForCausalLM(conf)
    n_params = sum(p.numel() for p in meta.parameters())
    n_embed = conf.vocab_size * conf.hidden_size
    model_dir = work / "config_only"
    _copy_tokenizer(model_dir)
    conf.save_pretrained(model_dir)  # config + tokenizer, no weights: engine.init_from=random
    block = 64
    cfg = compose(_overrides(work / "run", model_dir, seq_len=L, steps=args.iters, gbs=mbs, mbs=mbs, lr=1e-4,
                             block=block, max_documents=400 if cpu else 4000, cpu=cpu, attention=args.attention)
                  + ["engine.init_from=random", "model.mask_token_id=3"])
    job = build_job(cfg)
    _cpu_emulation(cpu)
    rows, wall, mem, attention = _train(job, cpu)
    steady = [r["ms"] for r in rows[2:]] or [r["ms"] for r in rows]
    t = statistics.median(steady) / 1000 if steady else math.nan
    S = 2 * L
    density = _mask_density(L, block)
    heads_dim = conf.num_attention_heads * (conf.hidden_size // conf.num_attention_heads)
    dense_flops = 6 * (n_params - n_embed) * S * mbs  # embedding lookup excluded, output head included
    attn_flops = 12 * conf.num_hidden_layers * S * S * heads_dim * density * mbs
    flops = dense_flops + attn_flops
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not cpu else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    mfu = flops / (t * peak) if peak else None
    return {"device": name, "params_b": round(n_params / 1e9, 3), "L": L, "S_model": S, "mbs": mbs,
            "iters": len(rows), "iter_ms": [round(r["ms"], 1) for r in rows], "median_iter_ms": round(t * 1000, 1),
            "tokens_per_s": round(S * mbs / t, 1), "clean_tokens_per_s": round(L * mbs / t, 1),
            "flops_per_iter": flops, "attention_pattern_density": round(density, 4), "peak_flops": peak,
            "mfu": round(mfu, 4) if mfu is not None else None, "peak_mem_gib": round(mem, 2), "attention": attention,
            "losses": [round(r.get("lm loss", math.nan), 4) for r in rows],
            "skipped": sum(r["skipped"] for r in rows),
            "pretrained_checkpoint": job.container.checkpoint.pretrained_checkpoint,
            "perform_initialization": bool(job.container.model.perform_initialization),
            "hf_dir_is_the_config_only_source": job.hf_dir == model_dir,
            "mfu_definition": "(6*(N - embedding)*2L + 12*layers*(2L)^2*d_attn*density) * mbs"
                              " / (median step time * bf16 dense peak)"}


def run_part(part: str, work: Path, *, cpu: bool, iters: int | None = None, attention: str = "auto",
             timeout: float = 600) -> tuple[dict, str]:
    """Run one part in its own process session (helpers it leaves behind are killed); returns
    ``(result, log)``. The result is ``{"ok": False, "error": ...}`` when the part did not finish."""
    import signal
    import subprocess

    root = Path(__file__).resolve().parents[3]
    work.mkdir(parents=True, exist_ok=True)
    out, log = work / f"{part}.json", work / f"{part}.log"
    cmd = [sys.executable, "-m", "tests.megatron.support.engine_check", part, "--work", str(work / part),
           "--out", str(out), "--attention", attention] + (["--iters", str(iters)] if iters else []) \
        + (["--cpu-emulate"] if cpu else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    with open(log, "w") as fh:  # a file, not pipes: a leftover helper could hold inherited pipes open
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = log.read_text(errors="replace")
    if not out.is_file():
        return {"ok": False, "error": f"no result (exit {proc.returncode}); log tail: {text[-3000:]}"}, text
    return json.loads(out.read_text()), text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["tiny", "mfu"])
    p.add_argument("--work", required=True, help="an empty work directory")
    p.add_argument("--out", required=True, help="the result JSON")
    p.add_argument("--iters", type=int, default=None, help="default: tiny 24, mfu 6")
    p.add_argument("--attention", default="auto", choices=["auto", "flex", "sdpa"], help="engine.megatron_attention")
    p.add_argument("--cpu-emulate", action="store_true", help="CPU, gloo, fp32 (the check's logic, not a measurement)")
    args = p.parse_args()
    if args.iters is None:
        args.iters = 24 if args.part == "tiny" else 6
    from . import import_megatron, single_process_env

    import_megatron(compile_fusions=False)
    single_process_env()
    try:
        res = {"ok": True, **{"tiny": part_tiny, "mfu": part_mfu}[args.part](args)}
    except BaseException as e:  # noqa: BLE001 - SystemExit from bridge internals too
        traceback.print_exc()
        res = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"ENGINE_CHECK {args.part}: {'ran' if res['ok'] else 'FAILED'} -> {args.out}", flush=True)
    sys.stdout.flush()
    os._exit(0 if res["ok"] else 1)  # Megatron may leave helper threads/processes behind


if __name__ == "__main__":
    main()
