"""The longest two-stream row a Megatron recipe can train per GPU, at context-parallel sizes 1, 2, 4, 8.

An ESTIMATE from a formula (docs/long_context.md, "Memory model"), not a measurement:

    python tools/long_context_memory.py recipe=nld_8b_pretrain                  # Markdown table
    python tools/long_context_memory.py recipe=nld_8b_pretrain --json           # the numbers
    python tools/long_context_memory.py recipe=nld_8b_longctx --gpu-gib 80 --gpus 64 --cp 1 2 4 8
    python tools/long_context_memory.py recipe=my_recipe --hf-config /path/config.json

It reads the recipe's parallelism (``engine.tp/pp``, distributed optimizer, ``engine.recompute``) and its
hardware line (``# Hardware: N nodes x 8 ...``: the GPU count the optimizer state is sharded over),
and the model's shape from its HF ``config.json`` (``--hf-config``, else ``model.path`` when it is a
local directory, else the table of known models below). For each cp it reports the largest clean
length L (the network runs on 2L positions) whose per-GPU memory fits, for the recipe's recompute
setting and for full recompute.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

GIB = 1024 ** 3

# the published Hub config.json values of the models the NLD recipes convert
KNOWN = {
    "mistralai/Ministral-3-3B-Base-2512": dict(layers=26, hidden=3072, ffn=9216, heads=32, kv_heads=8, head_dim=128,
                                               vocab=131072, max_positions=262144),
    "mistralai/Ministral-3-8B-Base-2512": dict(layers=34, hidden=4096, ffn=14336, heads=32, kv_heads=8, head_dim=128,
                                               vocab=131072, max_positions=262144),
    "mistralai/Ministral-3-14B-Base-2512": dict(layers=40, hidden=5120, ffn=16384, heads=32, kv_heads=8,
                                                head_dim=128, vocab=131072, max_positions=262144),
}


@dataclass(frozen=True)
class Shape:
    """A dense decoder (Llama-style: GQA attention, SwiGLU MLP, RMSNorm), untied head."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int | None = None  # the base model's max_position_embeddings (its trained context)

    @property
    def params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * self.ffn + 2 * h
        return self.layers * per_layer + 2 * self.vocab * h + h  # embedding + untied head + final norm

    @classmethod
    def from_hf_config(cls, conf: dict) -> "Shape":
        text = conf.get("text_config") or conf
        heads = text["num_attention_heads"]
        return cls(layers=text["num_hidden_layers"], hidden=text["hidden_size"], ffn=text["intermediate_size"],
                   heads=heads, kv_heads=text.get("num_key_value_heads") or heads,
                   head_dim=text.get("head_dim") or text["hidden_size"] // heads, vocab=text["vocab_size"],
                   max_positions=text.get("max_position_embeddings"))


@dataclass(frozen=True)
class Setup:
    """What the memory depends on besides the model: parallelism, recompute, the GPU."""

    tp: int
    pp: int
    gpus: int  # GPUs of the job: the distributed optimizer shards over data x context parallel = gpus/(tp·pp)
    distributed_optimizer: bool
    recompute: str | None  # None | selective | full
    micro_batch: int = 1  # rows per micro-batch
    gpu_gib: float = 80.0
    reserve_gib: float = 4.0  # CUDA context, NCCL buffers, kernels' workspaces
    usable_fraction: float = 0.9  # allocator fragmentation


def static_bytes(m: Shape, s: Setup) -> float:
    """Weights (bf16), gradients (fp32 buffer) and optimizer state (fp32 master + Adam m, v) per GPU."""
    local = m.params / (s.tp * s.pp)  # CP replicates the weights
    shards = s.gpus / (s.tp * s.pp) if s.distributed_optimizer else 1
    return local * (2 + 4) + local * 12 / shards


def layer_bytes_per_position(m: Shape, tp: int) -> float:
    """Activations one layer keeps for backward per position (bf16, tensor + sequence parallel, flex
    attention: no score matrix): norm inputs and outputs 4h, q/k/v 2(h+2kv), RoPE'd q/k 2(h+kv),
    attention output 2h, residual input of the MLP 2h, MLP input 2h, gate+up 4F, SwiGLU output 2F."""
    h, kv, f = m.hidden, m.kv_heads * m.head_dim, m.ffn
    return (14 * h + 6 * kv + 6 * f) / tp


def bytes_per_length(m: Shape, s: Setup, cp: int, recompute: str | None) -> float:
    """Memory that grows with L, per unit of L (2L/cp positions per rank and row of the micro-batch)."""
    per_layer = layer_bytes_per_position(m, s.tp)
    if recompute == "full":  # layer inputs only, plus one layer being recomputed
        per_pos = m.layers * 2 * m.hidden / s.tp + per_layer
        gathered_layers = 1
    else:  # selective recompute drops the attention scores, which flex-attention never stores
        per_pos = m.layers * per_layer
        gathered_layers = m.layers
    logits = m.vocab / s.tp * (2 + 4)  # vocab-parallel logits, bf16 + the fp32 copy the CE keeps
    local = 2 / cp * (per_pos + logits)
    # with cp > 1 the attention keeps the all-gathered keys and values of the whole row (2L positions)
    gathered = 0.0 if cp == 1 else gathered_layers * 2 * 2 * 2 * m.kv_heads * m.head_dim / s.tp
    return (local + gathered) * s.micro_batch


def longest_row(m: Shape, s: Setup, cp: int, recompute: str | None) -> int:
    """Largest L (clean tokens; a multiple of 128·cp) whose per-GPU memory fits the budget."""
    budget = s.gpu_gib * GIB * s.usable_fraction - s.reserve_gib * GIB - static_bytes(m, s)
    if budget <= 0:
        return 0
    step = 128 * cp
    return int(budget / bytes_per_length(m, s, cp, recompute)) // step * step


def table(m: Shape, s: Setup, cps=(1, 2, 4, 8)) -> list[dict]:
    rows = []
    for cp in cps:
        rows.append({"cp": cp, "gpus_per_replica": s.tp * s.pp * cp,
                     "L_recipe_recompute": longest_row(m, s, cp, s.recompute),
                     "L_full_recompute": longest_row(m, s, cp, "full")})
    return rows


def markdown(rows: list[dict], m: Shape, s: Setup, recipe: str) -> str:
    static = static_bytes(m, s) / GIB
    out = [f"Longest trainable row per GPU, recipe `{recipe}` (ESTIMATE, tools/long_context_memory.py): "
           f"{m.params / 1e9:.2f}B params, TP{s.tp} PP{s.pp}, micro-batch {s.micro_batch}, {s.gpus} GPUs, "
           f"{s.gpu_gib:g} GiB each, static {static:.1f} GiB/GPU; L = clean tokens (the network runs on 2L)"
           + (f"; * = beyond the base model's {m.max_positions:,} positions" if m.max_positions else ""),
           "",
           f"| cp | GPUs per replica | longest L (recompute {s.recompute or 'none'}) | longest L (full recompute) |",
           "|---|---|---|---|"]
    def cell(n: int) -> str:
        return f"{n:,}" + ("*" if m.max_positions and n > m.max_positions else "")

    for r in rows:
        out.append(f"| {r['cp']} | {r['gpus_per_replica']} | {cell(r['L_recipe_recompute'])} | "
                   f"{cell(r['L_full_recompute'])} |")
    return "\n".join(out)


def _hardware_gpus(recipe: str) -> int | None:
    from nemodiff_train.config.load import RECIPES_DIR

    path = Path(RECIPES_DIR) / f"{recipe}.yaml"
    if not path.is_file():
        return None
    hit = re.search(r"^# Hardware: (\d+) nodes x (\d+) ", path.read_text(), re.M)
    return int(hit.group(1)) * int(hit.group(2)) if hit else None


def shape_of(cfg, hf_config: str | None) -> Shape:
    if hf_config:
        return Shape.from_hf_config(json.loads(Path(hf_config).read_text()))
    local = Path(str(cfg.model.path)) / "config.json"
    if local.is_file():
        return Shape.from_hf_config(json.loads(local.read_text()))
    for key in (cfg.model.path, getattr(cfg.model, "hub_id", None)):
        if key in KNOWN:
            return Shape(**KNOWN[key])
    raise SystemExit(f"model.path={cfg.model.path!r} is neither a local directory nor a known model "
                     f"({sorted(KNOWN)}): pass --hf-config <config.json>")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="+", help="recipe=<name> and other config overrides")
    p.add_argument("--hf-config", default=None, help="the model's config.json (else model.path / known models)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs of the job (default: the recipe's Hardware line)")
    p.add_argument("--gpu-gib", type=float, default=80.0)
    p.add_argument("--reserve-gib", type=float, default=4.0)
    p.add_argument("--usable-fraction", type=float, default=0.9)
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    from nemodiff_train.config.load import compose

    cfg = compose(a.overrides)
    gpus = a.gpus or _hardware_gpus(cfg.recipe or "")
    if not gpus:
        raise SystemExit(f"recipe {cfg.recipe!r} has no '# Hardware: N nodes x G ...' line: pass --gpus")
    e = cfg.engine
    setup = Setup(tp=e.tp, pp=e.pp, gpus=gpus, distributed_optimizer=e.use_distributed_optimizer,
                  recompute=e.recompute, micro_batch=cfg.stages[0].micro_batch_size, gpu_gib=a.gpu_gib, reserve_gib=a.reserve_gib,
                  usable_fraction=a.usable_fraction)
    shape = shape_of(cfg, a.hf_config)
    rows = table(shape, setup, tuple(a.cp))
    if a.json:
        print(json.dumps({"recipe": cfg.recipe, "shape": asdict(shape), "setup": asdict(setup),
                          "params": shape.params, "static_gib": static_bytes(shape, setup) / GIB, "rows": rows},
                         indent=1))
    else:
        print(markdown(rows, shape, setup, cfg.recipe or "?"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
