"""Time the DLM (two-stream) training step against a plain AR step of the same model and batch.

Both run in the same process on the same weights, batch and device; the ratio is what matters
(PERFORMANCE.md target: ≤ 2.2× on CPU with the dense SDPA mask, ≤ 2.1× on GPU with flex-attention).

    python tools/bench_train_step.py                       # embedded tiny model, CPU
    python tools/bench_train_step.py --model DIR --seq-len 1024 --batch 1 --device cuda --dtype bfloat16
    python tools/bench_train_step.py --prepared runs/demo_cpu/data/sft --dtype bfloat16 --block-size 8

``--prepared`` takes the rows of a prepared split (their documents and loss masks: SFT prompts are
never masked) instead of random tokens. With a dense-mask attention (sdpa, the CPU) the DLM step is
also timed computing only the positions its loss reads (``engine.skip_unmasked_blocks``,
nemodiff_train/core/compaction.py): ``compact_step_ms`` and ``compact_speedup``.

The AR step is the unmodified HF model with its own causal attention and ``labels`` loss (what a user
would run); the DLM step is the trainer's (``models.step.collate`` + ``engines.torch.loss.TwoStreamLoss``) + backward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from nemodiff_train.assets.resolve import resolve_model_path
from nemodiff_train.core.losses import LossWeights
from nemodiff_train.engines.torch.loss import TwoStreamLoss
from nemodiff_train.models.attention import DENSE_MASK_IMPLEMENTATIONS
from nemodiff_train.models.hf import load_dlm
from nemodiff_train.models.step import collate


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
    ap.add_argument("--prepared", default=None, help="a prepared dataset split directory (nemodiff-data) to take rows from")
    ap.add_argument("--schedule", default="uniform", choices=["uniform", "position_dependent"])
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
    if args.prepared:
        from nemodiff_train.data import PackedDataset

        ds = PackedDataset(args.prepared, "train")
        rows = [{k: torch.as_tensor(v) for k, v in ds[i].items() if k in ("input_ids", "doc_ids", "loss_mask")}
                for i in torch.randperm(len(ds), generator=gen)[: args.batch].tolist()]
        x0 = torch.stack([r["input_ids"] for r in rows]).long()
    else:
        x0 = torch.randint(0, min(vocab, 4000), (args.batch, args.seq_len), generator=gen)
        rows = [{"input_ids": x, "doc_ids": torch.zeros_like(x), "loss_mask": torch.ones_like(x, dtype=torch.bool)}
                for x in x0]
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

    def dlm_step(loss_module):  # the trainer's step: noise the rows, then the loss module
        mb = collate(rows, list(range(args.batch)), seed=0, mask_token_id=dlm.settings.mask_token_id,
                     schedule=args.schedule, eps=1e-3, block_size=args.block_size, half_life_ratio=0.25,
                     keep_block_start=args.schedule == "position_dependent").to(device)
        with autocast:
            parts = loss_module(mb)
        (parts.numerator(w) / parts.denominator(w)).backward()

    whole = TwoStreamLoss(dlm, args.block_size, 2048)
    steps = {"ar": ar_step, "dlm": lambda: dlm_step(whole)}
    if attn in DENSE_MASK_IMPLEMENTATIONS:
        compact = TwoStreamLoss(dlm, args.block_size, 2048, skip_unmasked=True)
        steps["compact"] = lambda: dlm_step(compact)

    def timed(fn):
        for p in params:
            p.grad = None
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t

    for fn in steps.values():  # warm-up (and flex-attention compilation on CUDA)
        timed(fn)
    times = {name: [] for name in steps}
    for _ in range(args.repeats):  # interleaved so drifting machine load hits every variant alike
        for name, fn in steps.items():
            times[name].append(timed(fn))
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    ar_ms, dlm_ms = ms["ar"], ms["dlm"]
    result = {"model": args.random or args.model, "params": sum(p.numel() for p in dlm.parameters()), "device": str(device), "dtype": args.dtype, "attention": attn,
              "batch": args.batch, "seq_len": int(x0.shape[1]), "block_size": args.block_size, "rows": args.prepared or "random",
              "ar_step_ms": round(ar_ms, 2), "dlm_step_ms": round(dlm_ms, 2), "ratio": round(dlm_ms / ar_ms, 3),
              "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(f"AR step  {ar_ms:9.1f} ms\nDLM step {dlm_ms:9.1f} ms\nratio    {dlm_ms / ar_ms:9.2f}x  "
          f"(median of {args.repeats}; {args.batch}x{int(x0.shape[1])}, {device}, {args.dtype}, {attn})")
    if "compact" in ms:
        result.update(compact_step_ms=round(ms["compact"], 2), compact_speedup=round(dlm_ms / ms["compact"], 3))
        print(f"DLM step, loss positions only (engine.skip_unmasked_blocks) {ms['compact']:9.1f} ms: "
              f"{dlm_ms / ms['compact']:.2f}x faster than the whole rows")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
