"""Why is TPF what it is? Teacher-forced confidence of the diffusion view, per offset in the block.

Block diffusion commits several tokens in one step only where the diffusion view is confident (≥ τ)
at more than one masked position; linear self-speculation accepts draft k only when drafts 1..k are
all right. Both are bounded by how well the model predicts tokens *k ahead* from a block
``[seed, MASK × (B-1)]`` over the causal cache. This analysis measures exactly that on a task's
references (teacher forced: the cache holds the true prefix, the seed is the true next token):

* per offset k = 1 … B-1 of the block: top-1 accuracy, mean confidence, fraction with confidence ≥ τ,
  and how often the top token is right where its confidence is ≥ τ (``confident_accuracy``). Block
  diffusion commits every such token, so this precision, not the accuracy, decides its exact match:
  an answer of 60 tokens survives only if nearly every confident commit is right;
* the AR view beside it: next-token accuracy and confidence, and the AR chain's offset-2 accuracy
  (greedy token 1, then greedy token 2 given it), a rough ceiling for the diffusion view's offset 2.

Run it through the evaluator (writes ``headroom.json``, one object per task, and prints a table)::

    nemodiff-eval analysis=headroom model=runs/demo_cpu/hf task=[arithmetic,code_completion] out=runs/demo_cpu/headroom
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..models.loading import load_for_decoding
from ..tasks import get_task

log = logging.getLogger(__name__)

__all__ = ["measure", "format_headroom", "run_headroom"]


def block_view_probs(hf, context: list[int], block: list[int]) -> torch.Tensor:
    """Diffusion view: ``context`` causal, ``block`` bidirectional and seeing all of it. → ``[n, V]`` probs."""
    c, n = len(context), len(block)
    mask = torch.ones(c + n, c + n, dtype=torch.bool).tril()
    mask[c:, c:] = True
    device = next(hf.parameters()).device
    ids = torch.tensor([context + block], device=device)
    logits = hf(input_ids=ids, attention_mask=mask[None, None].to(device)).logits[0, c:].float()
    return logits.softmax(-1)


@torch.inference_mode()
def measure(dlm, task, eos: tuple[int, ...], block_size: int, threshold: float, max_ref_tokens: int,
            stride: int) -> dict:
    """The numbers described in the module docstring, as a dict."""
    hf, tok, mask_id = dlm.hf, dlm.tokenizer, dlm.settings.mask_token_id
    device = next(hf.parameters()).device
    per_offset = {k: {"correct": 0, "n": 0, "conf": 0.0, "confident": 0, "confident_correct": 0}
                  for k in range(1, block_size)}
    ar = {"correct": 0, "n": 0, "confident": 0}
    chain = {"correct": 0, "n": 0}
    for sample in task.samples():
        prompt = task.render(tok, sample)
        ref = list(tok.encode(sample.reference, add_special_tokens=False))[:max_ref_tokens] + list(eos[:1])
        probs = hf(input_ids=torch.tensor([prompt + ref], device=device)).logits[0, len(prompt) - 1:-1].float().softmax(-1)
        conf, top = probs.max(-1)  # [len(ref)]
        ar["n"] += len(ref)
        ar["correct"] += int((top.cpu() == torch.tensor(ref)).sum())
        ar["confident"] += int((conf.cpu() >= threshold).sum())
        for t in range(0, len(ref) - block_size, stride):
            context = prompt + ref[:t]
            view = block_view_probs(hf, context, [ref[t]] + [mask_id] * (block_size - 1))
            view[:, mask_id] = 0.0  # decoders never emit the mask token
            for k in range(1, block_size):
                c, a = view[k].max(0)
                s = per_offset[k]
                s["n"] += 1
                right, sure = int(a) == ref[t + k], float(c) >= threshold
                s["correct"] += right
                s["conf"] += float(c)
                s["confident"] += sure
                s["confident_correct"] += right and sure
            first = int(hf(input_ids=torch.tensor([context + ref[t:t + 1]], device=device)).logits[0, -1].argmax())
            second = int(hf(input_ids=torch.tensor([context + [ref[t], first]], device=device)).logits[0, -1].argmax())
            chain["n"] += 1
            chain["correct"] += second == ref[t + 2]
    return {
        "task": task.name, "block_size": block_size, "threshold": threshold, "samples": len(task.samples()),
        "ar": {"accuracy": ar["correct"] / ar["n"], "confident": ar["confident"] / ar["n"], "tokens": ar["n"]},
        "ar_chain_offset2_accuracy": chain["correct"] / max(chain["n"], 1),
        "diffusion": [{"offset": k, "accuracy": s["correct"] / s["n"], "mean_confidence": s["conf"] / s["n"],
                       "confident": s["confident"] / s["n"],
                       "confident_accuracy": s["confident_correct"] / s["confident"] if s["confident"] else None,
                       "blocks": s["n"]}
                      for k, s in per_offset.items() if s["n"]],
    }


def format_headroom(out: dict) -> str:
    """The numbers of :func:`measure` as text."""
    tau = out["threshold"]
    lines = [f"{out['task']}: AR view: next-token accuracy {out['ar']['accuracy']:.3f}, confidence >= {tau}: "
             f"{out['ar']['confident']:.3f} ({out['ar']['tokens']} tokens); "
             f"AR chain offset-2 accuracy {out['ar_chain_offset2_accuracy']:.3f}",
             f"  diffusion view, block [seed, MASK x {out['block_size'] - 1}]:",
             f"  offset | accuracy | mean conf | conf >= {tau} | right when conf >= {tau}"]
    for row in out["diffusion"]:
        precision = "-" if row["confident_accuracy"] is None else f"{row['confident_accuracy']:.3f}"
        lines.append(f"  {row['offset']:6d} | {row['accuracy']:8.3f} | {row['mean_confidence']:9.3f} | "
                     f"{row['confident']:.3f} | {precision}")
    return "\n".join(lines)


def run_headroom(cfg) -> list[dict]:
    """``nemodiff-eval analysis=headroom``: measure every task of ``cfg`` (an ``EvalConfig``).

    Uses ``cfg.block_size`` (default: the model's inference block), ``cfg.threshold``, ``cfg.limit``
    (default 20 rows) and ``cfg.headroom`` (stride between block starts, reference tokens per row).
    """
    dlm, _, eos, _ = load_for_decoding(cfg.model, cfg.dtype, cfg.device)
    block = cfg.block_size or dlm.settings.inference_block_size
    results = []
    for name in cfg.tasks:
        task = get_task(name, tokenizer=dlm.tokenizer, limit=cfg.limit_of(name) or 20, chat_template=cfg.chat_template)
        out = measure(dlm, task, eos, block, cfg.threshold, cfg.headroom.max_ref_tokens, cfg.headroom.stride)
        print(format_headroom(out), flush=True)
        results.append(out)
    path = Path(cfg.out) / "headroom.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    log.info("wrote %s", path)
    return results
