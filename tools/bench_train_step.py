"""Time the DLM (two-stream) training step against a plain AR step of the same model and batch.

Both run in the same process on the same weights, batch and device; the ratio is what matters
(PERFORMANCE.md target: ≤ 2.2× on CPU with the dense SDPA mask, ≤ 2.1× on GPU with flex-attention).

    python tools/bench_train_step.py                       # embedded tiny model, CPU
    python tools/bench_train_step.py --model DIR --seq-len 1024 --batch 1 --device cuda --dtype bfloat16

The AR step is the unmodified HF model with its own causal attention and ``labels`` loss (what a user
would run); the DLM step is the trainer's (``models.step.collate`` + ``joint_step``) + backward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from nemodiff_train.assets.resolve import resolve_model_path
from nemodiff_train.core.losses import LossWeights
from nemodiff_train.models.hf import load_dlm
from nemodiff_train.models.step import collate, joint_step


RANDOM_SHAPES = {
    # Qwen3-0.6B and Qwen3-1.7B shapes (random weights: timing only)
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
}


def _random_dlm(shape: str, device: torch.device, attn: str, block_size: int, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, Qwen3Config

    from nemodiff_train.models.hf import DLMModel, DLMSettings, untie_output_head

    cfg = Qwen3Config(**RANDOM_SHAPES[shape], max_position_embeddings=40960)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
    untie_output_head(hf)
    return DLMModel(hf, DLMSettings(mask_token_id=100, train_block_size=block_size))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--random", default=None, choices=sorted(RANDOM_SHAPES),
                    help="build a randomly initialised model of this shape instead of loading --model")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    device = torch.device(args.device)
    attn = "flex_attention" if device.type == "cuda" else "sdpa"
    dtype = getattr(torch, args.dtype)
    if args.random:
        dlm = _random_dlm(args.random, device, attn, args.block_size, torch.float32)
    else:
        dlm = load_dlm(resolve_model_path(args.model), device=device, attn_implementation=attn,
                       settings={"train_block_size": args.block_size})
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast(device.type, enabled=False)
    vocab = dlm.hf.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, min(vocab, 4000), (args.batch, args.seq_len), generator=gen)
    loss_mask = torch.ones_like(x0, dtype=torch.bool)
    params = [p for p in dlm.parameters() if p.requires_grad]
    w = LossWeights()

    def ar_step():
        # the AR baseline is what a user runs: the model's own causal SDPA path
        impl = dlm.hf.config._attn_implementation
        dlm.hf.config._attn_implementation = "sdpa"
        try:
            with autocast:
                out = dlm.hf(input_ids=x0.to(device), labels=x0.to(device), use_cache=False)
            out.loss.backward()
        finally:
            dlm.hf.config._attn_implementation = impl

    rows = [{"input_ids": x, "doc_ids": torch.zeros_like(x), "loss_mask": m} for x, m in zip(x0, loss_mask)]

    def dlm_step():  # the trainer's step: noise the rows, then models.step.joint_step
        mb = collate(rows, list(range(args.batch)), seed=0, mask_token_id=dlm.settings.mask_token_id,
                     schedule="uniform", eps=1e-3, block_size=args.block_size, half_life_ratio=0.25).to(device)
        with autocast:
            parts = joint_step(dlm, mb, args.block_size)
        (parts.numerator(w) / parts.denominator(w)).backward()

    def timed(fn):
        for p in params:
            p.grad = None
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t

    for fn in (ar_step, dlm_step):  # warm-up (and flex-attention compilation on CUDA)
        timed(fn)
    ar_times, dlm_times = [], []
    for _ in range(args.repeats):  # interleaved so drifting machine load hits both alike
        ar_times.append(timed(ar_step))
        dlm_times.append(timed(dlm_step))
    ar_ms, dlm_ms = statistics.median(ar_times) * 1e3, statistics.median(dlm_times) * 1e3
    result = {"model": args.random or args.model, "params": sum(p.numel() for p in dlm.parameters()), "device": str(device), "dtype": args.dtype, "attention": attn,
              "batch": args.batch, "seq_len": args.seq_len, "block_size": args.block_size,
              "ar_step_ms": round(ar_ms, 2), "dlm_step_ms": round(dlm_ms, 2), "ratio": round(dlm_ms / ar_ms, 3),
              "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(f"AR step  {ar_ms:9.1f} ms\nDLM step {dlm_ms:9.1f} ms\nratio    {dlm_ms / ar_ms:9.2f}x  "
          f"(median of {args.repeats}; {args.batch}x{args.seq_len}, {device}, {args.dtype}, {attn})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
