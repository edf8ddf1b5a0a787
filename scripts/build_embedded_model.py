#!/usr/bin/env python
"""Build the embedded default of nemodiff_train: a tiny Qwen3 AR base model, its tokenizer and
small datasets, all derived offline from the Python standard library's own source code and from
generated arithmetic word problems (``scripts/arithmetic_task.py``).

The committed assets under ``nemodiff_train/assets/`` were produced with (about an hour on 2 cores)::

    python scripts/build_embedded_model.py --out nemodiff_train/assets --steps 3000 --seed 0 --threads 2

``--vocab-size``, ``--num-layers`` and ``--threads`` build other variants; ``--quick`` a tiny one
for tests of this script. ``docs/embedded_tasks.md`` explains the choice of data and tokenizer.

Layout written under ``--out``::

    tiny_qwen3/                  model (safetensors, bf16) + fast tokenizer + nemodiff_embedded.json
    data/pretrain_train.jsonl.gz {"text", "source"} rows, one per stdlib module (train split)
    data/pretrain_val.jsonl.gz   the same for the val split
    data/sft_train.jsonl.gz      {"messages": [user: signature+docstring, assistant: body], "source"}
    data/sft_val.jsonl.gz        the same from val-split modules
    data/code_completion_test.jsonl  {"prompt", "reference", "source", "name"} from test-split modules
    data/arithmetic_*            word problems: conversion pretraining text, SFT chats, the test split

Everything is deterministic given ``--seed`` and the interpreter's stdlib (which differs slightly
between Python versions; the version used is recorded in the metadata). ``--quick`` builds a tiny
variant in well under a minute, for tests of this script itself.

Only the CPU is used, so that the build does not depend on an accelerator; for a fixed ``--threads``
the result is reproducible.
"""
from __future__ import annotations

import os

# One thread everywhere (torch intra-op, the tokenizers rayon pool): the build machine is shared
# and single-threaded reductions keep training bit-for-bit reproducible. Must precede the imports.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import ast
import dataclasses
import gzip
import hashlib
import io
import json
import math
import platform
import shlex
import sys
import sysconfig
import time
import tokenize
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

import arithmetic_task as arith  # sibling module: scripts/ is sys.path[0] when run as a script

# The task data does not depend on --seed (only initialisation and training order do).
ARITHMETIC_DATA_SEED = 1

# ----------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
MASK_TOKEN = "<|mask|>"
# Order fixes the ids: EOS/PAD = 0, ..., mask = 3.
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END, MASK_TOKEN]

# Directory components that are excluded from the corpus (tests would leak near-duplicates of
# library code across splits; idlelib/lib2to3 are large, unusual and deprecated).
EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3"})
MAX_FILE_BYTES = 200_000

# Qwen2/Qwen3's pre-tokenizer pattern (whitespace runs kept as their own pieces, which suits
# indented source code; digits split individually), except that a digit keeps the space before
# it, as words do: " 5" is one token. Otherwise every number starts with a lone " " token and a
# small model cannot copy an operand by looking up what followed the previous word.
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML; the assistant turn (content + <|im_end|>) is wrapped in generation markers so that
# apply_chat_template(..., return_assistant_tokens_mask=True) marks exactly the supervised tokens.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class BuildConfig:
    """Sizes of everything the script builds; ``quick`` swaps in a tiny variant."""

    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 512
    max_position_embeddings: int = 2048
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    val_rows: int = 64
    max_files: int | None = None  # cap on corpus files (quick mode only)
    pretrain_train_budget: int = 3_000_000  # compressed bytes
    sft_train_max_rows: int = 6000
    sft_val_max_rows: int = 500
    completion_rows: int = 200
    completion_max_body_lines: int = 12
    sft_max_body_lines: int = 25
    # The arithmetic word-problem task (scripts/arithmetic_task.py): problems the base is
    # pretrained on (chat form), then disjoint slices for the conversion's pretrain text and SFT rows.
    arithmetic_base_problems: int = 60000
    arithmetic_pretrain_rows: int = 6000
    arithmetic_sft_rows: int = 4000
    arithmetic_val_rows: int = 300
    arithmetic_test_rows: int = 200
    arithmetic_base_eval_rows: int = 100  # held-out problems the base is scored on (metadata only)
    # Packed code rows the base trains on (a deterministic subset, about a tenth of the training
    # rows): the arithmetic task needs most of the steps, because copying the question's numbers
    # is learnt late (held-out exact match 2 % after 400 math-only steps, 35 % after 900).
    base_code_rows: int | None = 4000
    # The first half of the steps sees arithmetic only, the second half arithmetic and code. A base
    # trained on the mix from step 0 (3000 steps) reached 12 % held-out exact match and copied the
    # "gets N more" operand as 2 in most answers; 900 math-only steps reached 35 %, and 500 more
    # math-only steps on the mixed base did not repair it (12 %): the copying must form first.
    arithmetic_only_fraction: float = 0.5


QUICK = BuildConfig(
    vocab_size=512, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
    intermediate_size=64, max_position_embeddings=256, seq_len=64, batch_size=4,
    warmup_steps=4, val_rows=8, max_files=60, pretrain_train_budget=200_000,
    sft_train_max_rows=100, sft_val_max_rows=20, completion_rows=20,
    arithmetic_base_problems=300, arithmetic_pretrain_rows=40, arithmetic_sft_rows=40, arithmetic_val_rows=10,
    arithmetic_test_rows=10, arithmetic_base_eval_rows=4, base_code_rows=None,
)


# ----------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceFile:
    """One stdlib module: its path relative to the stdlib root and its text."""

    rel: str
    text: str


def stdlib_root() -> Path:
    """Return the running interpreter's stdlib directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def iter_stdlib_paths(root: Path) -> Iterator[Path]:
    """Yield the corpus' ``.py`` files under ``root`` in sorted (deterministic) order."""
    for path in sorted(root.rglob("*.py")):
        rel_parts = path.relative_to(root).parts
        if any(part in EXCLUDED_DIRS for part in rel_parts[:-1]):
            continue
        if path.stat().st_size > MAX_FILE_BYTES:
            continue
        yield path


def read_source(path: Path) -> str | None:
    """Read a module honouring its coding cookie; None if it cannot be decoded or parsed."""
    try:
        with tokenize.open(path) as fh:  # universal newlines: "\r\n" becomes "\n"
            text = fh.read()
        ast.parse(text)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None
    # Literal special-token strings would be parsed as the special tokens themselves and the mask
    # token must stay unseen in training, so such files (none in CPython) are left out.
    if any(tok in text for tok in SPECIAL_TOKENS) or not text.strip():
        return None
    return text


def load_corpus(max_files: int | None) -> list[SourceFile]:
    """Load the stdlib corpus, optionally capped to a deterministic subset of ``max_files``."""
    root = stdlib_root()
    files = []
    for path in iter_stdlib_paths(root):
        text = read_source(path)
        if text is not None:
            files.append(SourceFile(path.relative_to(root).as_posix(), text))
    if max_files is not None:
        files = sorted(files, key=lambda f: stable_hash(f.rel, "quick"))[:max_files]
        files.sort(key=lambda f: f.rel)
    return files


def stable_hash(key: str, salt: str = "") -> int:
    """A process-independent hash (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha1(f"{salt}{key}".encode()).digest()[:8], "big")


def split_of(rel: str) -> str:
    """Assign a whole module to train/val/test (~86/5/9) by the sha1 of its relative path.

    Split by file, not by row, so held-out data is genuinely unseen code. The split does not
    depend on the seed so that re-seeding never moves modules between splits. The test share is
    9% rather than 5% because only about a third of stdlib modules' functions qualify for the
    code-completion task; 9% yields the ~200 rows the task wants.
    """
    bucket = stable_hash(rel) % 100
    if bucket < 86:
        return "train"
    return "val" if bucket < 91 else "test"


def split_corpus(files: list[SourceFile]) -> dict[str, list[SourceFile]]:
    """Group files by split, each list sorted by relative path."""
    splits: dict[str, list[SourceFile]] = {"train": [], "val": [], "test": []}
    for f in files:
        splits[split_of(f.rel)].append(f)
    return splits


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """Train a byte-level BPE (Qwen-style pre-tokenizer) and wrap it as a transformers tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=[IM_START, IM_END, MASK_TOKEN],
        clean_up_tokenization_spaces=False,  # would alter " ." etc. in code
        model_max_length=BuildConfig.max_position_embeddings,
    )
    # Named so the rest of the toolkit can find the diffusion mask token by attribute.
    hf_tok.mask_token = MASK_TOKEN
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def check_tokenizer(tokenizer: Any, samples: list[str]) -> None:
    """Fail loudly unless the tokenizer round-trips code exactly and the chat template works."""
    for text in samples:
        ids = encode(tokenizer, text)
        if tokenizer.decode(ids) != text:
            raise AssertionError("tokenizer does not round-trip source text exactly")
    messages = [{"role": "user", "content": "def f():\n"}, {"role": "assistant", "content": "    return 1\n"}]
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    supervised = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    if supervised != "    return 1\n" + IM_END:
        raise AssertionError(f"assistant mask covers {supervised!r}")
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    if prompt != f"{IM_START}user\ndef f():\n{IM_END}\n{IM_START}assistant\n":
        raise AssertionError(f"unexpected generation prompt {prompt!r}")


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------

def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a whole file; verbose=False because files exceed model_max_length."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def pack_tokens(tokenizer: Any, texts: Iterable[str], seq_len: int) -> torch.Tensor:
    """Concatenate tokenized texts, each followed by EOS, into ``[rows, seq_len]`` (tail dropped)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(encode(tokenizer, text))
        stream.append(eos)
    rows = len(stream) // seq_len
    return torch.tensor(stream[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


def count_tokens(tokenizer: Any, texts: Iterable[str]) -> int:
    """Number of tokens of the texts (without separators)."""
    return sum(len(encode(tokenizer, t)) for t in texts)


# ----------------------------------------------------------------------------------------------
# Model and training
# ----------------------------------------------------------------------------------------------

def make_model(cfg: BuildConfig, tokenizer: Any) -> Any:
    """A freshly initialised Qwen3 causal LM of the configured size."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,  # the AR->diffusion conversion unties it later
        rope_theta=10000.0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    return Qwen3ForCausalLM(config)


def lr_at(step: int, total: int, cfg: BuildConfig) -> float:
    """Linear warmup then cosine decay to ``min_lr_ratio * lr``."""
    warmup = min(cfg.warmup_steps, max(1, total // 10))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_model(model: Any, phases: list[tuple[torch.Tensor, int]], cfg: BuildConfig, seed: int) -> dict[str, Any]:
    """Plain causal-LM training through ``phases`` of ``(packed rows [N, seq_len], steps)``: each
    phase samples its rows without replacement per epoch; one LR schedule spans all phases."""
    steps = sum(n for _, n in phases)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # norms
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = time.time()
    log_every = max(1, steps // 40)
    phase_of_step = [i for i, (_, n) in enumerate(phases) for _ in range(n)]
    phase, rows, order, cursor = -1, None, None, 0
    for step in range(steps):
        if phase_of_step[step] != phase:  # next phase: its own rows, a fresh shuffle
            phase = phase_of_step[step]
            rows = phases[phase][0]
            order, cursor = torch.randperm(rows.shape[0], generator=gen), 0
        if cursor + cfg.batch_size > order.numel():  # new epoch: reshuffle
            order, cursor = torch.randperm(rows.shape[0], generator=gen), 0
        batch = rows[order[cursor: cursor + cfg.batch_size]]
        cursor += cfg.batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, cfg)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            elapsed = time.time() - start
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"elapsed {elapsed:.0f}s ({elapsed / (step + 1):.2f}s/step)", flush=True)
    return {
        "steps": steps,
        "tokens": steps * cfg.batch_size * cfg.seq_len,
        "time_s": round(time.time() - start, 1),
        "phases": [{"rows": int(r.shape[0]), "steps": n, "epochs": round(n * cfg.batch_size / r.shape[0], 3)}
                   for r, n in phases],
    }


@torch.no_grad()
def eval_ar_loss(model: Any, rows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy over all predicted positions of ``rows``."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, rows.shape[0], batch_size):
        batch = rows[i: i + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    return total / count


# ----------------------------------------------------------------------------------------------
# Function extraction (SFT + completion task)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FunctionSample:
    """A function split into its prompt (signature + docstring) and the rest of its body."""

    name: str
    prompt: str
    body: str
    body_lines: int


def iter_functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Top-level functions and methods of top-level classes, with qualified names."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{node.name}.{sub.name}", sub


def has_docstring(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """True if the first statement is a string literal."""
    first = fn.body[0]
    return isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)


def dedent_lines(lines: list[str], prefix: str) -> list[str] | None:
    """Strip the def line's indentation from every line; None if a line is indented less.

    One prefix for prompt and body keeps them consistent: ``prompt + body`` is valid code.
    Blank lines may be shorter than the prefix.
    """
    out = []
    for line in lines:
        if line.startswith(prefix):
            out.append(line[len(prefix):])
        elif not line.strip():
            out.append("\n")
        else:
            return None
    return out


def extract_function(lines: list[str], name: str, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> FunctionSample | None:
    """Cut one documented function into prompt and body; None if it does not qualify."""
    if not has_docstring(fn) or len(fn.body) < 2:
        return None
    doc, first_stmt = fn.body[0], fn.body[1]
    # The docstring must sit on its own lines: nothing after it on its last line, and not on
    # the def line itself (a one-line "def f(): 'doc'").
    if doc.lineno == fn.lineno or first_stmt.lineno <= doc.end_lineno:
        return None
    def_line = lines[fn.lineno - 1]
    prefix = def_line[: len(def_line) - len(def_line.lstrip())]
    prompt = dedent_lines(lines[fn.lineno - 1: doc.end_lineno], prefix)
    body = dedent_lines(lines[doc.end_lineno: fn.end_lineno], prefix)
    if prompt is None or body is None:
        return None
    return FunctionSample(name=name, prompt="".join(prompt), body="".join(body), body_lines=len(body))


def extract_functions(source: SourceFile, max_body_lines: int) -> list[FunctionSample]:
    """All qualifying functions of a module whose body has 1..max_body_lines lines."""
    tree = ast.parse(source.text)
    # split("\n") rather than splitlines(): ast counts only newlines, while splitlines() would
    # also break on form feeds and other separators found in stdlib sources.
    lines = [line + "\n" for line in source.text.split("\n")]
    samples = []
    for name, fn in iter_functions(tree):
        sample = extract_function(lines, name, fn)
        if sample is None or not 1 <= sample.body_lines <= max_body_lines:
            continue
        try:
            ast.parse(sample.prompt + sample.body)  # guards the prompt/body contract
        except SyntaxError:
            continue
        samples.append(sample)
    return samples


def sft_row(sample: FunctionSample, source: str) -> dict[str, Any]:
    """Chat row: the user gives signature + docstring, the assistant writes the body."""
    return {
        "messages": [
            {"role": "user", "content": sample.prompt},
            {"role": "assistant", "content": sample.body},
        ],
        "source": source,
    }


def build_sft_rows(files: list[SourceFile], max_body_lines: int, max_rows: int, salt: str) -> list[dict[str, Any]]:
    """SFT rows from ``files``, a deterministic subset of at most ``max_rows``, in corpus order."""
    keyed = []
    for f in files:
        for s in extract_functions(f, max_body_lines):
            keyed.append((stable_hash(f"{f.rel}:{s.name}", salt), f.rel, s))
    chosen = sorted(keyed, key=lambda k: k[0])[:max_rows]
    chosen.sort(key=lambda k: (k[1], k[2].name))
    return [sft_row(s, rel) for _, rel, s in chosen]


def build_completion_rows(files: list[SourceFile], max_body_lines: int, max_rows: int, salt: str) -> list[dict[str, Any]]:
    """The held-out code-completion task: prompt (signature+docstring) -> reference body."""
    keyed = []
    for f in files:
        for s in extract_functions(f, max_body_lines):
            row = {"prompt": s.prompt, "reference": s.body, "source": f.rel, "name": s.name}
            keyed.append((stable_hash(f"{f.rel}:{s.name}", salt), row))
    chosen = [row for _, row in sorted(keyed, key=lambda k: k[0])[:max_rows]]
    chosen.sort(key=lambda r: (r["source"], r["name"]))
    return chosen


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

def jsonl_bytes(rows: Iterable[dict[str, Any]]) -> bytes:
    """Serialise rows as UTF-8 JSON lines."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def write_jsonl_gz(path: Path, rows: list[dict[str, Any]]) -> None:
    """gzip with mtime=0 and no embedded file name, so rebuilding gives identical bytes."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(jsonl_bytes(rows))
    path.write_bytes(buf.getvalue())


def pretrain_rows(files: list[SourceFile], budget: int | None) -> list[dict[str, Any]]:
    """``{"text", "source"}`` rows; with a budget, a deterministic subset of about ``budget`` gz bytes.

    Each row's own zlib size is summed, which slightly over-estimates the size of the whole
    gzip stream, so the budget is respected.
    """
    rows = [{"text": f.text, "source": f.rel} for f in files]
    if budget is None:
        return rows
    kept, used = [], 0
    for row in sorted(rows, key=lambda r: stable_hash(r["source"], "pretrain")):
        size = len(zlib.compress(jsonl_bytes([row]), 9))
        if used + size > budget:
            continue
        kept.append(row)
        used += size
    return sorted(kept, key=lambda r: r["source"])


def save_model(model: Any, tokenizer: Any, out_dir: Path) -> None:
    """Save weights in bf16 (halves the package size; loaders cast back to fp32) + tokenizer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def dir_size(path: Path) -> int:
    """Total bytes of regular files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line interface."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "nemodiff_train" / "assets")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 3000, quick: 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny config and data, for tests of this script")
    p.add_argument("--vocab-size", type=int, default=None, help=f"BPE vocabulary (default {BuildConfig.vocab_size})")
    p.add_argument("--num-layers", type=int, default=None, help=f"transformer layers (default {BuildConfig.num_layers})")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads; results are reproducible for a fixed count (default 1)")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Build every asset under ``args.out`` and return the metadata written."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = QUICK if args.quick else BuildConfig()
    if args.vocab_size is not None:
        cfg = dataclasses.replace(cfg, vocab_size=args.vocab_size)
    if args.num_layers is not None:
        cfg = dataclasses.replace(cfg, num_layers=args.num_layers)
    steps = args.steps if args.steps is not None else (20 if args.quick else 3000)
    model_dir, data_dir = args.out / "tiny_qwen3", args.out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)

    files = load_corpus(cfg.max_files)
    splits = split_corpus(files)
    print({k: len(v) for k, v in splits.items()}, "files", flush=True)
    train_texts = [f.text for f in splits["train"]]
    problems = arithmetic_problems(cfg)
    base_problems = problems["base"]

    t0 = time.time()
    # The BPE is learnt on code only: the task's made-up names then split into the same generic
    # pieces in every split, instead of becoming whole tokens that held-out names never use.
    tokenizer = train_tokenizer(train_texts, cfg.vocab_size)
    check_tokenizer(tokenizer, [f.text for f in splits["val"][:20]] + ["\tx = 1  \n\n\n    y\r\n"])
    print(f"tokenizer: {len(tokenizer)} tokens in {time.time() - t0:.0f}s", flush=True)

    code_rows = pack_tokens(tokenizer, train_texts, cfg.seq_len)
    if cfg.base_code_rows is not None and code_rows.shape[0] > cfg.base_code_rows:
        keep = torch.randperm(code_rows.shape[0], generator=torch.Generator().manual_seed(0))[: cfg.base_code_rows]
        code_rows = code_rows[keep.sort().values]
    arithmetic_rows = pack_tokens(tokenizer, arithmetic_base_texts(tokenizer, base_problems), cfg.seq_len)
    train_rows = torch.cat([code_rows, arithmetic_rows])
    val_rows = pack_tokens(tokenizer, [f.text for f in splits["val"]], cfg.seq_len)[: cfg.val_rows]
    print(f"packed {code_rows.shape[0]} code + {arithmetic_rows.shape[0]} arithmetic train rows, "
          f"{val_rows.shape[0]} val rows", flush=True)

    # Data files first: cheap, and they do not depend on the model.
    write_data(splits, cfg, data_dir)
    write_arithmetic_data(problems, data_dir)

    model = make_model(cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)
    first = round(steps * cfg.arithmetic_only_fraction)
    train_info = train_model(model, [(arithmetic_rows, first), (train_rows, steps - first)], cfg, args.seed)
    val_loss = eval_ar_loss(model, val_rows, cfg.batch_size)
    print(f"base_val_ar_loss {val_loss:.4f}", flush=True)
    arithmetic_accuracy = base_arithmetic_accuracy(model, tokenizer, problems["test"][: cfg.arithmetic_base_eval_rows])
    print(f"base arithmetic accuracy (greedy, held-out test rows): {arithmetic_accuracy:.3f}", flush=True)
    save_model(model, tokenizer, model_dir)

    meta = {
        "description": "Embedded default of nemodiff_train: tiny Qwen3 AR base + tokenizer + data, "
                       "derived from the Python standard library's source code and generated "
                       "arithmetic word problems (scripts/arithmetic_task.py).",
        "command": " ".join(["python", "scripts/build_embedded_model.py"] + [shlex.quote(a) for a in sys.argv[1:]]),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "seed": args.seed,
        "quick": args.quick,
        "splits": {
            name: {"files": len(fs), "tokens": count_tokens(tokenizer, (f.text for f in fs))}
            for name, fs in splits.items()
        },
        "tokenizer": {
            "vocab_size": len(tokenizer),
            "eos_token": EOS_TOKEN, "eos_token_id": tokenizer.eos_token_id,
            "pad_token": EOS_TOKEN, "pad_token_id": tokenizer.pad_token_id,
            "mask_token": MASK_TOKEN, "mask_token_id": tokenizer.convert_tokens_to_ids(MASK_TOKEN),
            "im_start_id": tokenizer.convert_tokens_to_ids(IM_START),
            "im_end_id": tokenizer.convert_tokens_to_ids(IM_END),
        },
        "mask_token_id": tokenizer.convert_tokens_to_ids(MASK_TOKEN),
        "eos_token_id": tokenizer.eos_token_id,
        "model": {"architecture": "Qwen3ForCausalLM", "num_parameters": n_params, "saved_dtype": "bfloat16"},
        "training": {
            **train_info, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "warmup_steps": cfg.warmup_steps, "schedule": "linear warmup + cosine to 0.1*lr",
            "optimizer": "AdamW(0.9, 0.95), wd 0.1, clip 1.0", "precision": f"fp32, CPU, {args.threads} thread(s)",
        },
        "base_val_ar_loss": round(val_loss, 4),
        "base_val_ar_loss_rows": {"rows": int(val_rows.shape[0]), "seq_len": cfg.seq_len},
        "base_arithmetic_accuracy": {"value": round(arithmetic_accuracy, 4),
                                     "rows": min(cfg.arithmetic_base_eval_rows, len(problems["test"])),
                                     "how": "greedy chat-form answers, #### number exact match, held-out test split"},
        "train_rows": {"code": int(code_rows.shape[0]), "arithmetic": int(arithmetic_rows.shape[0])},
        "data_files": {p.name: json_count(p) for p in sorted(data_dir.iterdir())},
    }
    (model_dir / "nemodiff_embedded.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out}: {dir_size(args.out) / 1e6:.2f} MB", flush=True)
    return meta


def json_count(path: Path) -> int:
    """Number of rows of a jsonl(.gz) file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return sum(1 for _ in fh)


def write_data(splits: dict[str, list[SourceFile]], cfg: BuildConfig, data_dir: Path) -> None:
    """Write the pretraining, SFT and code-completion files."""
    # Fixed salt: the data does not depend on --seed (only initialisation/order of training do).
    salt = "nemodiff-v1"
    write_jsonl_gz(data_dir / "pretrain_train.jsonl.gz", pretrain_rows(splits["train"], cfg.pretrain_train_budget))
    write_jsonl_gz(data_dir / "pretrain_val.jsonl.gz", pretrain_rows(splits["val"], None))
    write_jsonl_gz(data_dir / "sft_train.jsonl.gz",
                   build_sft_rows(splits["train"], cfg.sft_max_body_lines, cfg.sft_train_max_rows, salt))
    write_jsonl_gz(data_dir / "sft_val.jsonl.gz",
                   build_sft_rows(splits["val"], cfg.sft_max_body_lines, cfg.sft_val_max_rows, salt))
    completion = build_completion_rows(splits["test"], cfg.completion_max_body_lines, cfg.completion_rows, salt)
    (data_dir / "code_completion_test.jsonl").write_bytes(jsonl_bytes(completion))
    for p in sorted(data_dir.iterdir()):
        print(f"  {p.name}: {json_count(p)} rows, {p.stat().st_size / 1e3:.0f} kB", flush=True)


def arithmetic_problems(cfg: BuildConfig) -> dict[str, list[arith.Problem]]:
    """The task's problems: disjoint train slices (base, conversion pretrain text, SFT), val, test."""
    n_base, n_pre, n_sft = cfg.arithmetic_base_problems, cfg.arithmetic_pretrain_rows, cfg.arithmetic_sft_rows
    train = arith.generate_problems(n_base + n_pre + n_sft, "train", ARITHMETIC_DATA_SEED)
    return {
        "base": train[:n_base],
        "pretrain": train[n_base:n_base + n_pre],
        "sft": train[n_base + n_pre:],
        "val": arith.generate_problems(cfg.arithmetic_val_rows, "val", ARITHMETIC_DATA_SEED),
        "test": arith.generate_problems(cfg.arithmetic_test_rows, "test", ARITHMETIC_DATA_SEED),
    }


def arithmetic_base_texts(tokenizer: Any, problems: list[arith.Problem]) -> list[str]:
    """The base's arithmetic pretraining documents: every problem as a chat (the form the
    evaluator prompts with), and every fourth one also as plain text (the conversion's form)."""
    texts = [tokenizer.apply_chat_template(arith.chat_row(p)["messages"], tokenize=False) for p in problems]
    texts += [arith.plain_text(p) for p in problems[::4]]
    order = sorted(range(len(texts)), key=lambda i: stable_hash(str(i), "arithmetic-order"))
    return [texts[i] for i in order]


@torch.no_grad()
def base_arithmetic_accuracy(model: Any, tokenizer: Any, problems: list[arith.Problem]) -> float:
    """Fraction of ``problems`` whose greedy chat answer ends in the right ``#### <number>``."""
    model.eval()
    end_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)]
    correct = 0
    for p in problems:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": p.question}], tokenize=False,
                                               add_generation_prompt=True)
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
        out = model.generate(ids, max_new_tokens=96, do_sample=False, eos_token_id=end_ids,
                             pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        correct += f"#### {p.answer}" == text.strip().splitlines()[-1].strip() if text.strip() else 0
    return correct / max(1, len(problems))


def write_arithmetic_data(problems: dict[str, list[arith.Problem]], data_dir: Path) -> None:
    """The arithmetic task's files: conversion pretraining text, SFT rows, and the test split."""
    def text_rows(ps):
        return [{"text": arith.plain_text(p), "source": f"arithmetic:{p.template}"} for p in ps]

    write_jsonl_gz(data_dir / "arithmetic_pretrain_train.jsonl.gz", text_rows(problems["pretrain"]))
    write_jsonl_gz(data_dir / "arithmetic_pretrain_val.jsonl.gz", text_rows(problems["val"]))
    write_jsonl_gz(data_dir / "arithmetic_sft_train.jsonl.gz", [arith.chat_row(p) for p in problems["sft"]])
    write_jsonl_gz(data_dir / "arithmetic_sft_val.jsonl.gz", [arith.chat_row(p) for p in problems["val"]])
    (data_dir / "arithmetic_test.jsonl").write_bytes(jsonl_bytes(arith.test_row(p) for p in problems["test"]))
    for p in sorted(data_dir.glob("arithmetic_*")):
        print(f"  {p.name}: {json_count(p)} rows, {p.stat().st_size / 1e3:.0f} kB", flush=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    build(parse_args(argv))


if __name__ == "__main__":
    main()
