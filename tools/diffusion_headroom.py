"""Why is TPF what it is? Teacher-forced confidence of the diffusion view, per offset in the block.

Block diffusion commits several tokens in one step only where the diffusion view is confident (≥ τ)
at more than one masked position; linear self-speculation accepts draft k only when drafts 1..k are
all right. Both are bounded by how well the model predicts tokens *k ahead* from a block
``[seed, MASK × (B-1)]`` over the causal cache. This tool measures exactly that on a task's
references (teacher forced: the cache holds the true prefix, the seed is the true next token):

* per offset k = 1 … B-1 of the block: top-1 accuracy, mean confidence, fraction with confidence ≥ τ;
* the AR view beside it: next-token accuracy and confidence, and the AR chain's offset-2 accuracy
  (greedy token 1, then greedy token 2 given it), a rough ceiling for the diffusion view's offset 2.

    python tools/diffusion_headroom.py runs/demo_cpu/hf                       # bundled code-completion task
    python tools/diffusion_headroom.py out/hf --task rows.jsonl --limit 50 --block-size 32 --json h.json

Measured on the 2-core CPU (20 held-out functions, B = 8, τ = 0.9), the ``demo_cpu`` output: AR
next-token accuracy 0.29 (8.8 % of tokens at ≥ 0.9), AR chain offset 2: 0.17; diffusion offset 1:
0.23 (4.9 % ≥ 0.9), offset 2: 0.12 (none ≥ 0.9): no denoising step can commit two tokens, so
block-diffusion TPF stays at 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nemodiff_train.eval.loading import load_for_eval  # noqa: E402
from nemodiff_train.eval.tasks import get_task  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="HF directory or run directory (as nemodiff-eval takes)")
    p.add_argument("--task", default="code_completion", help="a built-in task name or a jsonl file")
    p.add_argument("--limit", type=int, default=20, help="task rows to use")
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--threshold", type=float, default=0.9, help="τ: the confidence counted as 'committable'")
    p.add_argument("--max-ref-tokens", type=int, default=40, help="reference tokens per row to score")
    p.add_argument("--stride", type=int, default=3, help="distance between block starts in a reference")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the numbers here")
    return p.parse_args(argv)


def block_view_probs(hf, context: list[int], block: list[int]) -> torch.Tensor:
    """Diffusion view: ``context`` causal, ``block`` bidirectional and seeing all of it. → ``[n, V]`` probs."""
    c, n = len(context), len(block)
    mask = torch.ones(c + n, c + n, dtype=torch.bool).tril()
    mask[c:, c:] = True
    ids = torch.tensor([context + block])
    logits = hf(input_ids=ids, attention_mask=mask[None, None]).logits[0, c:].float()
    return logits.softmax(-1)


@torch.inference_mode()
def measure(dlm, task, eos: tuple[int, ...], block_size: int, threshold: float, max_ref_tokens: int,
            stride: int) -> dict:
    """The numbers described in the module docstring, as a dict."""
    hf, tok, mask_id = dlm.hf, dlm.tokenizer, dlm.settings.mask_token_id
    per_offset = {k: {"correct": 0, "n": 0, "conf": 0.0, "confident": 0} for k in range(1, block_size)}
    ar = {"correct": 0, "n": 0, "confident": 0}
    chain = {"correct": 0, "n": 0}
    for sample in task.samples():
        prompt = task.render(tok, sample)
        ref = list(tok.encode(sample.reference, add_special_tokens=False))[:max_ref_tokens] + list(eos[:1])
        probs = hf(input_ids=torch.tensor([prompt + ref])).logits[0, len(prompt) - 1:-1].float().softmax(-1)
        conf, top = probs.max(-1)  # [len(ref)]
        ar["n"] += len(ref)
        ar["correct"] += int((top == torch.tensor(ref)).sum())
        ar["confident"] += int((conf >= threshold).sum())
        for t in range(0, len(ref) - block_size, stride):
            context = prompt + ref[:t]
            view = block_view_probs(hf, context, [ref[t]] + [mask_id] * (block_size - 1))
            view[:, mask_id] = 0.0  # decoders never emit the mask token
            for k in range(1, block_size):
                c, a = view[k].max(0)
                s = per_offset[k]
                s["n"] += 1
                s["correct"] += int(a) == ref[t + k]
                s["conf"] += float(c)
                s["confident"] += float(c) >= threshold
            first = int(hf(input_ids=torch.tensor([context + ref[t:t + 1]])).logits[0, -1].argmax())
            second = int(hf(input_ids=torch.tensor([context + [ref[t], first]])).logits[0, -1].argmax())
            chain["n"] += 1
            chain["correct"] += second == ref[t + 2]
    return {
        "block_size": block_size, "threshold": threshold, "samples": len(task.samples()),
        "ar": {"accuracy": ar["correct"] / ar["n"], "confident": ar["confident"] / ar["n"], "tokens": ar["n"]},
        "ar_chain_offset2_accuracy": chain["correct"] / max(chain["n"], 1),
        "diffusion": [{"offset": k, "accuracy": s["correct"] / s["n"], "mean_confidence": s["conf"] / s["n"],
                       "confident": s["confident"] / s["n"], "blocks": s["n"]}
                      for k, s in per_offset.items() if s["n"]],
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dlm, _, eos, _ = load_for_eval(args.model, device="cpu")
    task = get_task(args.task, tokenizer=dlm.tokenizer, limit=args.limit)
    out = measure(dlm, task, eos, args.block_size, args.threshold, args.max_ref_tokens, args.stride)
    tau = args.threshold
    print(f"AR view: next-token accuracy {out['ar']['accuracy']:.3f}, confidence >= {tau}: "
          f"{out['ar']['confident']:.3f} ({out['ar']['tokens']} tokens); "
          f"AR chain offset-2 accuracy {out['ar_chain_offset2_accuracy']:.3f}")
    print(f"diffusion view, block [seed, MASK x {args.block_size - 1}]:")
    print(f"  offset | accuracy | mean conf | conf >= {tau}")
    for row in out["diffusion"]:
        print(f"  {row['offset']:6d} | {row['accuracy']:8.3f} | {row['mean_confidence']:9.3f} | {row['confident']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
