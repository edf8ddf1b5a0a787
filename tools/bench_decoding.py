"""Benchmark the decoding modes on the same prompts and settings, in one process.

Prints per mode: TPF (generated tokens / forwards, prefill excluded), tokens/s, tokens/s relative
to ``ar`` measured here, and the lossless fraction (outputs equal to ``ar`` token for token; only
meaningful at temperature 0). Every prompt is decoded alone (batch 1), as self-speculation requires.

    PYTHONPATH=. python tools/bench_decoding.py                    # tiny random Qwen3, random prompts (CPU)
    PYTHONPATH=. python tools/bench_decoding.py --model out/hf --prompts prompts.jsonl --json bench.json

``--model`` is an HF directory loaded with ``nemodiff_train.models.hf.load_dlm``; ``--prompts`` a
jsonl file with ``{"prompt": "..."}`` (or ``{"prompt_ids": [...]}``) per line.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nemodiff_train.decoding import MODES, DecodeConfig, generate  # noqa: E402
from nemodiff_train.models.cached import HFCachedLM  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model directory (default: a tiny random Qwen3 built in-process)")
    p.add_argument("--prompts", help="jsonl with {'prompt': text} or {'prompt_ids': [...]} per line")
    p.add_argument("--n", type=int, default=8, help="number of prompts")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {sorted(MODES)}")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--threshold", default="0.9", help="diffusion confidence threshold, or 'none' for fixed steps")
    p.add_argument("--steps-per-block", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--eos", type=int, nargs="*", default=None, help="EOS ids (default: the tokenizer's, if any)")
    p.add_argument("--mask-token", default=None, help="mask token id or string for load_dlm")
    p.add_argument("--device", default="cpu")
    p.add_argument("--attn", default="sdpa", help="attention implementation for --model (the decoders pass dense masks)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompt-len", type=int, default=16, help="length of random prompts (no --prompts)")
    p.add_argument("--init-range", type=float, default=0.1, help="init std of the default tiny random model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", help="write the per-mode results here")
    return p.parse_args(argv)


def tiny_random_model(init_range: float, seed: int):
    """A 2-layer random Qwen3 (vocab 256, untied head, mask = last id): exercises the code, not quality."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                      tie_word_embeddings=False, initializer_range=init_range)
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float().eval()
    return HFCachedLM(hf, mask_token_id=cfg.vocab_size - 1), None


def load_model(args):
    from nemodiff_train.models.hf import load_dlm

    mask = args.mask_token
    if mask is not None and mask.isdigit():
        mask = int(mask)
    dlm = load_dlm(args.model, mask_token=mask, dtype=getattr(torch, args.dtype), device=args.device,
                   attn_implementation=args.attn)
    dlm.eval()
    return HFCachedLM(dlm), dlm.tokenizer


def load_prompts(args, lm, tokenizer) -> list[list[int]]:
    if args.prompts is None:
        rng = random.Random(args.seed)
        usable = [t for t in range(lm.vocab_size) if t != lm.mask_token_id]
        return [[rng.choice(usable) for _ in range(args.prompt_len)] for _ in range(args.n)]
    prompts = []
    for line in Path(args.prompts).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "prompt_ids" in row:
            prompts.append([int(t) for t in row["prompt_ids"]])
        elif tokenizer is None:
            raise SystemExit("text prompts need a model directory with a tokenizer; give prompt_ids instead")
        else:
            prompts.append(tokenizer.encode(row["prompt"]))
        if len(prompts) == args.n:
            break
    return prompts


def run_mode(lm, prompts, mode, cfg) -> tuple[list, float]:
    generate(lm, prompts[:1], mode, cfg)  # warm-up (allocations, lazy imports)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = [generate(lm, [p], mode, cfg)[0] for p in prompts]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return results, time.perf_counter() - start


def summarise(mode, results, seconds, ar_results, ar_tps) -> dict:
    tokens = sum(r.stats.generated_tokens for r in results)
    forwards = sum(r.stats.forwards for r in results)
    drafted = sum(r.stats.drafted for r in results)
    tps = tokens / seconds
    return {"mode": mode, "samples": len(results), "generated_tokens": tokens, "forwards": forwards,
            "tpf": tokens / max(forwards, 1), "mean_tpf": sum(r.stats.tpf for r in results) / len(results),
            "tokens_per_s": tps, "speedup_vs_ar": tps / ar_tps if ar_tps else 1.0,
            "lossless": sum(r.tokens == a.tokens for r, a in zip(results, ar_results)) / len(results),
            "acceptance": sum(r.stats.accepted for r in results) / drafted if drafted else None,
            "seconds": seconds}


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    lm, tokenizer = load_model(args) if args.model else tiny_random_model(args.init_range, args.seed)
    prompts = load_prompts(args, lm, tokenizer)
    eos = args.eos if args.eos is not None else ([tokenizer.eos_token_id] if tokenizer is not None
                                                 and tokenizer.eos_token_id is not None else [])
    threshold = None if args.threshold.lower() == "none" else float(args.threshold)
    cfg = DecodeConfig(max_new_tokens=args.max_new_tokens, block_size=args.block_size, threshold=threshold,
                       steps_per_block=args.steps_per_block, temperature=args.temperature, top_p=args.top_p,
                       eos_token_ids=tuple(eos), seed=args.seed)
    modes = ["ar"] + [m for m in args.modes.split(",") if m and m != "ar"]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {sorted(MODES)}")
    rows, ar_results, ar_tps = [], None, None
    for mode in modes:
        results, seconds = run_mode(lm, prompts, mode, cfg)
        if mode == "ar":
            ar_results, ar_tps = results, sum(r.stats.generated_tokens for r in results) / seconds
        rows.append(summarise(mode, results, seconds, ar_results, ar_tps))
    print_table(rows, cfg, len(prompts))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "results": rows}, indent=2))
    return rows


def print_table(rows: list[dict], cfg: DecodeConfig, n: int) -> None:
    print(f"{n} prompts, max_new_tokens={cfg.max_new_tokens}, B={cfg.block_size}, threshold={cfg.threshold}, "
          f"T={cfg.temperature}  (forwards exclude the prefill)")
    print(f"{'mode':<16}{'tokens':>8}{'forwards':>10}{'TPF':>7}{'tok/s':>10}{'vs ar':>8}{'lossless':>10}{'accept':>8}")
    for r in rows:
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        print(f"{r['mode']:<16}{r['generated_tokens']:>8}{r['forwards']:>10}{r['tpf']:>7.2f}{r['tokens_per_s']:>10.1f}"
              f"{r['speedup_vs_ar']:>7.2f}x{r['lossless']:>10.2f}{acc:>8}")


if __name__ == "__main__":
    main()
