#!/usr/bin/env python3
"""GPU check of the Megatron engine on ONE H100/H200 without Transformer Engine or internet (< 5 min).

    python3 tools/gpu_megatron_check.py            # on the GPU machine, from the repo root
    python3 tools/gpu_megatron_check.py --cpu-emulate --tiny-iters 4 --mfu-iters 2   # local test of the script

What it does:

0. installs the carried wheels (``.device/wheels/*.whl``: megatron-core 0.19.2, megatron-bridge 0.6.2,
   hydra-core, omegaconf, antlr4, einops, psutil; ``.device/wheels/optional`` (tensorboard + deps) only
   when ``import tensorboard`` fails) into ``/tmp/nemodiff_mb_site`` with ``pip --no-index --no-deps``;
1. part ``tiny``: a tiny random Qwen3 (HF checkpoint, mask id in range) → ``to_container`` →
   ``megatron.bridge.training.pretrain`` with our two-stream attention (flex-attention; SDPA fallback
   is reported) and ``TwoStreamForwardStep`` for >= 20 iterations on packed synthetic rows; checks that
   the loss falls and that the first loss equals the torch engine's loss (``models.step.joint_step``, fp32, on the same global batch and weights) within 2 % (bf16);
   reports iteration time and peak memory;
2. part ``mfu``: a ~1.2B Llama-shaped model (random init) for a few iterations at 2L = 4096 tokens; MFU =
   model FLOPs (6·N·tokens + attention over the pattern's allowed pairs) / (time × bf16 dense peak).

Each part runs in its own subprocess under a hard timeout. Output: ``$OUT/megatron_gpu.json`` (and the
parts' logs next to it); a one-line verdict ``MEGATRON_GPU: PASS|FAIL ...`` on stdout.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(os.environ.get("NEMODIFF_MB_SITE", "/tmp/nemodiff_mb_site"))
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------
# orchestrator
# ------------------------------------------------------------------------------------------------


def install_wheels(wheels: Path) -> dict:
    t0 = time.time()
    info: dict = {"site": str(SITE)}
    import importlib.util

    try:
        if importlib.util.find_spec("megatron.bridge") is not None:
            info["megatron"] = "preinstalled"
            return info
    except (ImportError, ValueError):
        pass
    whls = sorted(glob.glob(str(wheels / "*.whl")))
    if not whls:
        raise FileNotFoundError(f"no wheels in {wheels} (see tests/megatron/INSTALL.md: GPU wheels)")
    try:
        import tensorboard  # noqa: F401
    except Exception:
        whls += sorted(glob.glob(str(wheels / "optional" / "*.whl")))
        info["tensorboard"] = "installed from optional wheels"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--disable-pip-version-check", "--upgrade", "--target", str(SITE), *whls]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"pip install failed: {r.stderr[-2000:]}")
    info.update(wheels=[Path(w).name for w in whls], seconds=round(time.time() - t0, 1))
    return info


def run_part(part: str, timeout: int, out: Path, extra: list[str]) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SITE), str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
               PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    part_json = out / f"part_{part}.json"
    part_log = out / f"part_{part}.log"
    part_json.unlink(missing_ok=True)
    t0 = time.time()
    with open(part_log, "w") as fh:
        p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--part", part, "--out", str(out), *extra],
                             cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            p.wait(timeout=timeout)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        finally:
            try:
                os.killpg(p.pid, 9)  # this part's own session: leftover workers included
            except ProcessLookupError:
                pass
    res = json.loads(part_json.read_text()) if part_json.is_file() else {}
    res.setdefault("ok", False)
    res["rc"] = rc
    res["wall_s"] = round(time.time() - t0, 1)
    if not part_json.is_file():
        tail = part_log.read_text(errors="replace").splitlines()[-40:]
        res["error"] = res.get("error") or f"no result (rc={rc}); log tail: " + " | ".join(t[:200] for t in tail[-12:])
    return res


def orchestrate(args) -> int:
    t0 = time.time()
    out = Path(args.out or os.environ.get("OUT") or "/tmp/nemodiff_mb_out")
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "python": sys.version.split()[0]}
    try:
        import torch

        summary["torch"] = torch.__version__
        summary["cuda"] = torch.cuda.is_available()
        summary["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception as e:
        summary["torch"] = f"import failed: {e}"
    try:
        summary["install"] = install_wheels(ROOT / ".device" / "wheels")
    except Exception as e:
        summary["install"] = {"error": str(e)}
        summary["verdict"] = "FAIL install"
        (out / "megatron_gpu.json").write_text(json.dumps(summary, indent=1))
        log(f"MEGATRON_GPU: FAIL install: {e}")
        return 1
    extra = ["--cpu-emulate"] if args.cpu_emulate else []
    extra += ["--tiny-iters", str(args.tiny_iters), "--mfu-iters", str(args.mfu_iters)]
    summary["tiny"] = run_part("tiny", args.tiny_timeout, out, extra)
    keys = ("ok", "first_loss", "torch_engine_loss", "loss_first3", "loss_last3", "median_iter_ms", "peak_mem_gib",
            "attention", "error")
    log(f"MEGATRON_GPU_TINY: {json.dumps({k: summary['tiny'].get(k) for k in keys})}")
    left = args.budget - (time.time() - t0)
    if summary["tiny"].get("attention") == "sdpa-fallback":  # flex did not compile here: do not pay for it twice
        extra += ["--attention", "sdpa"]
    if left > 45:
        summary["mfu"] = run_part("mfu", int(min(args.mfu_timeout, left - 10)), out, extra)
    else:
        summary["mfu"] = {"ok": False, "error": f"skipped: only {left:.0f}s of the budget left"}
    keys = ("ok", "params_b", "median_iter_ms", "tokens_per_s", "mfu", "peak_mem_gib", "attention", "error")
    log(f"MEGATRON_GPU_MFU: {json.dumps({k: summary['mfu'].get(k) for k in keys})}")
    summary["total_s"] = round(time.time() - t0, 1)
    ok = summary["tiny"].get("ok") and summary["mfu"].get("ok")
    summary["verdict"] = "PASS" if ok else "FAIL"
    (out / "megatron_gpu.json").write_text(json.dumps(summary, indent=1))
    log(f"MEGATRON_GPU: {summary['verdict']} (total {summary['total_s']}s) -> {out / 'megatron_gpu.json'}")
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------------
# parts (subprocesses)
# ------------------------------------------------------------------------------------------------


def _import_megatron(cpu: bool):
    sys.path.insert(0, str(ROOT / "tools"))
    import megatron_shims

    megatron_shims.install()
    import torch

    real_compile = torch.compile
    # megatron-core wraps its fusion helpers in torch.compile at import time; compiling those needs a host C
    # compiler at run time. They are unused here (fusions off), so import them uncompiled (as the smoke did).
    torch.compile = lambda model=None, **kw: model if model is not None else (lambda fn: fn)
    try:
        import megatron.bridge.training.pretrain  # noqa: F401
    finally:
        torch.compile = real_compile
    megatron_shims.patch_after_import()
    return megatron_shims


def _cpu_emulation(cpu: bool) -> None:
    if cpu:  # after any torch-engine reference computation: the patches perturb HF modeling numerics slightly
        import megatron_cpu_emulation

        megatron_cpu_emulation.apply()


def _dist_env() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def _synthetic_prepared(root: Path, rows: int, seq_len: int, vocab: int, seed: int, val_rows: int = 8) -> Path:
    """Packed rows of short documents with learnable structure (arithmetic progressions mod vocab)."""
    import numpy as np

    from nemodiff_train.data.format import FORMAT_VERSION, create_split_arrays, write_meta

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", rows), ("val", val_rows)):
        arrs = create_split_arrays(root, split, n, seq_len)
        for r in range(n):
            pos, doc = 0, 0
            while pos < seq_len:
                length = int(min(seq_len - pos, rng.integers(seq_len // 4, seq_len)))
                start, step = int(rng.integers(16, vocab)), int(rng.integers(1, 7))
                arrs["tokens"][r, pos:pos + length] = 16 + (start + step * np.arange(length)) % (vocab - 16)
                arrs["docs"][r, pos:pos + length] = doc
                pos += length
                doc += 1
        arrs["loss_mask"][:] = 1
        for a in arrs.values():
            a.flush()
        splits[split] = {"rows": n}
    write_meta(root, {"format_version": FORMAT_VERSION, "seq_len": seq_len, "splits": splits,
                      "fingerprint": f"synthetic-{seed}"})
    return root


class _Recorder:
    def __new__(cls, use_cuda: bool):
        import torch
        from megatron.bridge.training.callbacks import Callback

        class Rec(Callback):
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
                dt = time.perf_counter() - self.t
                vals = {k: float(v) for k, v in (context.loss_dict or {}).items()}
                self.rows.append({"ms": dt * 1000, **vals, "skipped": bool(context.skipped_iter)})
                log(f"ITER {len(self.rows)} {json.dumps(self.rows[-1])}")

        return Rec()


def _base_cfg(run_dir: Path, model_dir: Path, seq_len: int, steps: int, gbs: int, mbs: int, lr: float, cpu: bool,
              block: int, attention: str = "auto"):
    from nemodiff_train.config.load import compose

    ov = ["recipe=tiny_cpu", "engine=megatron", f"run.dir={run_dir}", f"model.path={model_dir}",
          "model.mask_token_id=3",
          f"stages.0.steps={steps}", f"stages.0.global_batch_size={gbs}", f"stages.0.micro_batch_size={mbs}",
          f"stages.0.lr={lr}", f"optim.lr={lr}", f"optim.min_lr={lr / 10}", f"stages.0.data.seq_len={seq_len}",
          f"diffusion.block_size={block}", "diffusion.inference_block_size=16", "schedule.warmup_fraction=0.1",
          "checkpoint.every=100000", "logging.every=1", "logging.val_every=0", "export.at_end=false",
          "engine.use_distributed_optimizer=true", f"engine.megatron_attention={attention}"]
    if cpu:
        ov += ["engine.device=cpu", "engine.precision=fp32"]
    return compose(ov)


def _train(cfg, hf_dir: Path, prepared: Path, cpu: bool, iters: int):
    import torch
    from megatron.bridge.training.pretrain import pretrain

    from nemodiff_train.engines.megatron import attention as att
    from nemodiff_train.engines.megatron.config import to_container
    from nemodiff_train.engines.megatron.data import convert_prepared
    from nemodiff_train.engines.megatron.step import TwoStreamForwardStep

    run_dir = Path(cfg.run.dir)
    prefixes = convert_prepared(prepared, run_dir / "megatron" / "data")
    c = to_container(cfg, hf_dir=hf_dir, train_blend=[prefixes["train"]], valid_blend=[], cpu=cpu)
    c.checkpoint.save = None  # timing run: no checkpoints
    c.checkpoint.load = None
    c.logger.tensorboard_dir = None
    c.dataset.num_workers = 0
    c.dist.disable_jit_fuser = True
    d = cfg.diffusion
    step = TwoStreamForwardStep(mask_token_id=cfg.model.mask_token_id, schedule=d.schedule, eps=d.eps,
                                block_size=d.block_size, half_life_ratio=d.half_life_ratio, alpha=d.alpha, beta=d.beta)
    rec = _Recorder(not cpu)
    t0 = time.time()
    pretrain(c, step, callbacks=[rec])
    wall = time.time() - t0
    use_cuda = torch.cuda.is_available() and not cpu
    mem = torch.cuda.max_memory_allocated() / 2**30 if use_cuda else 0.0
    if not use_cuda:
        attention = "sdpa-cpu"
    elif att._flex_failed:
        attention = "sdpa-fallback"
    else:
        attention = "flex" if cfg.engine.megatron_attention in ("auto", "flex") else "sdpa"
    return rec.rows, wall, mem, attention, c


def _start_part(args, name: str) -> tuple[bool, Path]:
    """Common start of a part: Megatron imported, single-process dist env, an empty work dir."""
    import shutil

    _import_megatron(args.cpu_emulate)
    _dist_env()
    work = Path(args.work) / name
    shutil.rmtree(work, ignore_errors=True)
    return args.cpu_emulate, work


def part_tiny(args) -> dict:
    cpu, work = _start_part(args, "tiny")
    import torch

    from tests.helpers.tiny_models import save_tiny_model

    vocab, L = 512, 256
    hf_dir = save_tiny_model(work / "hf", "qwen3", vocab_size=vocab, tie=False, hidden_size=256, intermediate_size=768,
                             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                             initializer_range=0.02)
    iters = args.tiny_iters
    gbs, mbs = 8, 4
    prepared = _synthetic_prepared(work / "prep", rows=64, seq_len=L, vocab=vocab, seed=0)
    cfg = _base_cfg(work / "run", hf_dir, L, iters, gbs, mbs, 1e-3, cpu, block=32, attention=args.attention)
    # torch engine on the first global batch (positions 0..gbs-1), same init weights, fp32; computed first,
    # before Megatron touches global state
    from nemodiff_train.core.losses import LossWeights
    from nemodiff_train.data.order import GlobalOrder
    from nemodiff_train.data.packed import PackedDataset
    from nemodiff_train.models.hf import load_dlm
    from nemodiff_train.models.step import collate, joint_step

    dev = "cuda" if (torch.cuda.is_available() and not cpu) else "cpu"
    dlm = load_dlm(hf_dir, mask_token=3, untie_head=True, device=dev, attn_implementation="sdpa")
    ds = PackedDataset(prepared, "train")
    order = GlobalOrder(len(ds), cfg.run.seed, 0)
    d = cfg.diffusion
    mb = collate([ds[order.row(p)] for p in range(gbs)], list(range(gbs)), seed=cfg.run.seed, mask_token_id=3,
                 schedule=d.schedule, eps=d.eps, block_size=d.block_size, half_life_ratio=d.half_life_ratio).to(dev)
    with torch.no_grad():
        parts = joint_step(dlm, mb, d.block_size)
    w = LossWeights(d.alpha, d.beta)
    ref = float(parts.numerator(w) / parts.denominator(w))
    del dlm, parts
    if dev == "cuda":
        torch.cuda.empty_cache()
    _cpu_emulation(cpu)
    rows, wall, mem, attention, c = _train(cfg, hf_dir, prepared, cpu, iters)
    losses = [r.get("lm loss", math.nan) for r in rows]
    steady = [r["ms"] for r in rows[2:]] or [r["ms"] for r in rows]
    k = max(1, min(5, len(losses) // 3))  # the loss is noisy (one t per row): compare window means
    first3, last3 = sum(losses[:k]) / k, sum(losses[-k:]) / k
    rel = abs(losses[0] - ref) / abs(ref)
    tol = 2e-2 if not cpu else 1e-4
    ok = (len(rows) == iters and all(math.isfinite(x) for x in losses) and last3 < first3 - 0.1 and rel <= tol
          and not any(r["skipped"] for r in rows))
    return {"ok": bool(ok), "iters": len(rows), "losses": [round(x, 4) for x in losses],
            "ar_loss": [round(r.get("ar_loss", math.nan), 4) for r in rows],
            "diffusion_loss": [round(r.get("diffusion_loss", math.nan), 4) for r in rows],
            "loss_first3": round(first3, 4), "loss_last3": round(last3, 4), "loss_window": k,
            "first_loss": round(losses[0], 5),
            "torch_engine_loss": round(ref, 5), "first_loss_rel_diff": rel, "tolerance": tol,
            "median_iter_ms": round(statistics.median(steady), 1), "first_iter_ms": round(rows[0]["ms"], 1),
            "pretrain_wall_s": round(wall, 1), "peak_mem_gib": round(mem, 2), "attention": attention,
            "model": "qwen3 4L d256 8q/4kv heads, vocab 512", "L": L, "gbs": gbs, "mbs": mbs,
            "precision": "fp32 (cpu)" if cpu else "bf16_mixed"}


def _mask_density(L: int, block: int) -> float:

    from nemodiff_train.core.masks import SequenceLayout, dense_mask

    m = dense_mask("two_stream", SequenceLayout(L, block), 1)
    return float(m.float().mean())


def part_mfu(args) -> dict:
    cpu, work = _start_part(args, "mfu")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if cpu:  # script test only
        shape = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=1024)
        L, mbs = 128, 2
    else:  # ~1.2B: 16 x (4·2048² attn-ish + 3·2048·8192 MLP) + 2 x 32000·2048 embeddings/head
        shape = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
                     num_key_value_heads=8, vocab_size=32000)
        L, mbs = 2048, 2
    conf = LlamaConfig(**shape, max_position_embeddings=8192, tie_word_embeddings=False, rope_theta=500000.0,
                       architectures=["LlamaForCausalLM"])
    hf_dir = work / "hf"
    with torch.device("meta"):
        meta = LlamaForCausalLM(conf)
    n_params = sum(p.numel() for p in meta.parameters())
    n_embed = conf.vocab_size * conf.hidden_size
    hf_dir.mkdir(parents=True)
    conf.save_pretrained(hf_dir)  # config only: the model starts from random init (no weights to load)
    iters = args.mfu_iters
    prepared = _synthetic_prepared(work / "prep", rows=max(8, iters * mbs), seq_len=L, vocab=conf.vocab_size, seed=1,
                                   val_rows=2)
    cfg = _base_cfg(work / "run", hf_dir, L, iters, mbs, mbs, 1e-4, cpu, block=64, attention=args.attention)
    from nemodiff_train.engines.megatron import config as mcfg

    orig = mcfg.to_container

    def no_pretrained(*a, **k):  # random init: no HF weights to start from
        c = orig(*a, **k)
        c.checkpoint.pretrained_checkpoint = None
        c.model.perform_initialization = True
        return c

    mcfg.to_container = no_pretrained
    _cpu_emulation(cpu)
    rows, wall, mem, attention, c = _train(cfg, hf_dir, prepared, cpu, iters)
    steady = [r["ms"] for r in rows[2:]] or [r["ms"] for r in rows]
    t = statistics.median(steady) / 1000
    S = 2 * L
    density = _mask_density(L, 64) if L <= 4096 else 0.25
    heads_dim = conf.num_attention_heads * (conf.hidden_size // conf.num_attention_heads)
    dense_flops = 6 * (n_params - n_embed) * S * mbs  # embedding lookup excluded, output head included
    attn_flops = 12 * conf.num_hidden_layers * S * S * heads_dim * density * mbs
    flops = dense_flops + attn_flops
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    mfu = flops / (t * peak) if (peak and not cpu) else None
    losses = [r.get("lm loss", math.nan) for r in rows]
    ok = len(rows) == iters and all(math.isfinite(x) for x in losses) and (cpu or (mfu is not None and mfu > 0.02))
    return {"ok": bool(ok), "device": name, "params_b": round(n_params / 1e9, 3), "L": L, "S_model": S, "mbs": mbs,
            "iters": len(rows), "iter_ms": [round(r["ms"], 1) for r in rows], "median_iter_ms": round(t * 1000, 1),
            "tokens_per_s": round(S * mbs / t, 1), "clean_tokens_per_s": round(L * mbs / t, 1),
            "flops_per_iter": flops, "attention_pattern_density": round(density, 4), "peak_flops": peak,
            "mfu": round(mfu, 4) if mfu is not None else None, "peak_mem_gib": round(mem, 2), "attention": attention,
            "losses": [round(x, 4) for x in losses],
            "mfu_definition": "(6*(N - embedding)*2L + 12*layers*(2L)^2*d_attn*density) * mbs"
                              " / (median step time * bf16 dense peak)"}


def part_main(args) -> int:
    out = Path(args.out)
    res_path = out / f"part_{args.part}.json"
    try:
        res = {"tiny": part_tiny, "mfu": part_mfu}[args.part](args)
    except BaseException as e:  # noqa: BLE001 - SystemExit from bridge internals too
        traceback.print_exc()
        res = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:500]}"}
    res_path.write_text(json.dumps(res, indent=1))
    log(f"PART {args.part}: {'PASS' if res.get('ok') else 'FAIL'}")
    sys.stdout.flush()
    os._exit(0 if res.get("ok") else 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["tiny", "mfu"])
    p.add_argument("--out", default=None)
    p.add_argument("--work", default="/tmp/nemodiff_mb_work")
    p.add_argument("--cpu-emulate", action="store_true", help="LOCAL TEST OF THIS SCRIPT ONLY (CPU, gloo, fp32)")
    p.add_argument("--attention", default="auto", choices=["auto", "flex", "sdpa"], help="engine.megatron_attention")
    p.add_argument("--tiny-iters", type=int, default=24)
    p.add_argument("--mfu-iters", type=int, default=6)
    p.add_argument("--tiny-timeout", type=int, default=150)
    p.add_argument("--mfu-timeout", type=int, default=120)
    p.add_argument("--budget", type=int, default=285, help="seconds for everything (install + both parts)")
    args = p.parse_args()
    if args.part:
        return part_main(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
