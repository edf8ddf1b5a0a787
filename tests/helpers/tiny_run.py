"""A tiny model directory (random Qwen3 + tiny BPE tokenizer) and text/chat data files for run tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

from .tiny_models import save_tiny_model
from .tiny_tokenizer import make_tiny_tokenizer

WORDS = "def return self value import class for in if else while print data index list item key".split()


def make_model_dir(directory: Path, family: str = "qwen3", seed: int = 0) -> Path:
    directory = Path(directory)
    tok = make_tiny_tokenizer(directory)
    save_tiny_model(directory, family, seed=seed, vocab_size=len(tok), tie=True,
                    bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return directory


def write_text_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(8, 40))]
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    return Path(path)


def write_chat_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    return Path(path)


def make_run_assets(root: Path) -> Path:
    """``root`` with a tiny model (``model/``) and text data (``train.jsonl``, ``val.jsonl``) for a CLI run."""
    root.mkdir(parents=True, exist_ok=True)
    make_model_dir(root / "model")
    write_text_jsonl(root / "train.jsonl", 120)
    write_text_jsonl(root / "val.jsonl", 12, seed=1)
    return root


def tiny_cpu_args(assets: Path, run_dir: Path, *extra: str) -> list[str]:
    """``nemodiff-train`` arguments: the tiny_cpu recipe on :func:`make_run_assets`' model and data."""
    return ["recipe=tiny_cpu", f"run.dir={run_dir}", f"model.path={assets / 'model'}",
            f"stages.0.data.sources=[{assets / 'train.jsonl'}]", f"stages.0.data.val_sources=[{assets / 'val.jsonl'}]",
            *extra]
