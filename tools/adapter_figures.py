"""Full conversion vs drafter adapter: trainable parameters, estimated peak training memory, step time.

    python tools/adapter_figures.py                          # embedded model (measured) + the 8B shape (estimated)
    python tools/adapter_figures.py --rank 16 --steps 5 --json figures.json

Trainable parameters are counted exactly: the embedded model's by attaching the adapter, the 8B
shape's (Ministral-3 8B, conf/model/ministral3_8b.yaml) from its dimensions. Step time is measured for
the embedded model only (this process, one micro-batch of the trainer's step: collate + two-stream
forward + backward + AdamW step). Peak memory is an ESTIMATE from the formula below (one device, no
sharding; a CPU cannot measure a GPU's peak):

    static bytes   full conversion: 16 P              (fp32 weights 4 + fp32 grads 4 + AdamW moments 8, per parameter)
                   adapter:          4 P + 16 T        (the frozen base is held in fp32 as the trainer loads it; T trainable)
    activations    with activation checkpointing, the same for both: the bf16 input of every layer,
                   n_layers * b * 2L * d * 2, plus one layer's recomputed working set,
                   b * 2L * (12 d + 3 ffn) * 2, plus the chunked logits, 3 * chunk * V * 4

where 2L is the two-stream row ([x_t ; x_0]). The adapter's backward still runs through the frozen
base (activation gradients), so its compute is about 4 P per token instead of 6 P: no weight grads.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

MINISTRAL3_8B = dict(layers=34, d=4096, ffn=14336, heads=32, kv_heads=8, head_dim=128, vocab=131072, tied=False)
TARGET_SHAPES = {  # (in, out) of each attention projection
    "q_proj": lambda s: (s["d"], s["heads"] * s["head_dim"]),
    "k_proj": lambda s: (s["d"], s["kv_heads"] * s["head_dim"]),
    "v_proj": lambda s: (s["d"], s["kv_heads"] * s["head_dim"]),
    "o_proj": lambda s: (s["heads"] * s["head_dim"], s["d"]),
}


def base_parameters(s: dict) -> int:
    attn = sum(i * o for i, o in (f(s) for f in TARGET_SHAPES.values()))
    mlp = 3 * s["d"] * s["ffn"]
    norms = 2 * s["d"] + 2 * s["head_dim"]
    emb = s["vocab"] * s["d"] * (1 if s["tied"] else 2)
    return s["layers"] * (attn + mlp + norms) + emb + s["d"]


def adapter_parameters(s: dict, rank: int, targets) -> int:
    per_layer = sum(rank * sum(TARGET_SHAPES[t](s)) for t in targets)
    return s["layers"] * per_layer + s["d"]  # + the mask row


def memory_gb(s: dict, trainable: int, total: int, adapter: bool, batch: int, seq_len: int, chunk: int = 2048) -> dict:
    static = 4 * total + 16 * trainable if adapter else 16 * total
    tokens = batch * 2 * seq_len
    acts = s["layers"] * tokens * s["d"] * 2 + tokens * (12 * s["d"] + 3 * s["ffn"]) * 2 + 3 * chunk * s["vocab"] * 4
    return {"static_gb": static / 1e9, "activations_gb": acts / 1e9, "peak_gb": (static + acts) / 1e9}


def embedded_shape() -> tuple[dict, "object"]:
    from nemodiff_train.assets.resolve import resolve_model_path

    path = resolve_model_path("embedded")
    cfg = json.loads((path / "config.json").read_text())
    s = dict(layers=cfg["num_hidden_layers"], d=cfg["hidden_size"], ffn=cfg["intermediate_size"],
             heads=cfg["num_attention_heads"], kv_heads=cfg["num_key_value_heads"], head_dim=cfg["head_dim"],
             vocab=cfg["vocab_size"], tied=cfg["tie_word_embeddings"])
    return s, path


def time_steps(path, adapter_rank: int | None, targets, steps: int, batch: int, seq_len: int) -> tuple[float, int, int]:
    """Median seconds of one trainer step on the embedded model; the trainable and total parameter counts
    (a full conversion unties the head, as the trainer does: its total includes the head's copy)."""
    from nemodiff_train.models.hf import load_dlm
    from nemodiff_train.models.step import collate, joint_step

    dlm = load_dlm(path, mask_token=3, untie_head=adapter_rank is None, settings={"train_block_size": 16})
    if adapter_rank is not None:
        dlm.add_adapter(rank=adapter_rank, alpha=2.0 * adapter_rank, target_modules=tuple(targets))
    module = dlm.adapter if dlm.adapter is not None else dlm.hf
    params = [p for p in module.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(10, 4000, (seq_len,), generator=g), "doc_ids": torch.zeros(seq_len),
             "loss_mask": torch.ones(seq_len)} for _ in range(batch)]
    mb = collate(rows, list(range(batch)), seed=0, mask_token_id=3, schedule="uniform", eps=1e-3, block_size=16,
                 half_life_ratio=0.25)
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        parts = joint_step(dlm, mb, 16)
        (parts.diffusion_sum + parts.ar_sum).backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        if i:  # the first step warms up
            times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2], sum(p.numel() for p in params), sum(p.numel() for p in dlm.hf.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (embedded model, this machine)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    targets = args.targets.split(",")
    rows = []
    s, path = embedded_shape()
    full_t, full_n, full_total = time_steps(path, None, targets, args.steps, args.batch, args.seq_len)
    lora_t, lora_n, lora_total = time_steps(path, args.rank, targets, args.steps, args.batch, args.seq_len)
    assert lora_total == base_parameters(s) and lora_n == adapter_parameters(s, args.rank, targets)  # the formulas
    for name, n, t, total in (("full", full_n, full_t, full_total), ("adapter", lora_n, lora_t, lora_total)):
        rows.append({"model": "embedded (measured)", "variant": name, "trainable": n, "base": total,
                     "step_s": round(t, 4), "batch": args.batch, "seq_len": args.seq_len,
                     **memory_gb(s, n, total, name == "adapter", args.batch, args.seq_len)})
    s8 = MINISTRAL3_8B
    total8 = base_parameters(s8)
    for name, n in (("full", total8), ("adapter", adapter_parameters(s8, args.rank, targets))):
        rows.append({"model": "ministral3-8b (estimated)", "variant": name, "trainable": n, "base": total8,
                     "step_s": None, "batch": 1, "seq_len": 4096,
                     **memory_gb(s8, n, total8, name == "adapter", 1, 4096)})
    print(f"{'model':28s} {'variant':8s} {'trainable':>14s} {'share':>7s} {'static GB':>10s} {'acts GB':>8s} "
          f"{'peak GB':>8s} {'step s':>8s}")
    for r in rows:
        print(f"{r['model']:28s} {r['variant']:8s} {r['trainable']:>14,d} {r['trainable'] / r['base']:>7.2%} "
              f"{r['static_gb']:>10.3f} {r['activations_gb']:>8.3f} {r['peak_gb']:>8.3f} "
              f"{'' if r['step_s'] is None else format(r['step_s'], '.3f'):>8s}")
    print("memory: ESTIMATE (formula in this file's docstring); step time: measured on this machine, embedded model")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rank": args.rank, "targets": targets, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
