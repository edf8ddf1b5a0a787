"""Builders shared by the export tests (no tests here): tiny DLMs and training-run directories.

A run directory is laid out as the torch engine writes it (engines/torch/checkpointing.py, setup.py):
``config.yaml``, ``hf_base/`` (config with the ``nemodiff`` settings + tokenizer + generation config,
no weights) and ``checkpoints/step_XXXXXXXX/`` (DCP save of ``{"model": HF state dict, ...}``,
``trainer_state.json``, ``COMPLETE``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny_models import save_tiny_model
from tests.helpers.tiny_tokenizer import make_tiny_tokenizer



@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run ~100x faster on one intra-op thread than on two busy shared cores (import it with
    autouse into a test module)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


VOCAB = 320  # the tiny tokenizer's size; an added <|mask|> becomes id 320
RESERVED_MASK = 5


def make_base(directory: Path, family: str = "qwen3", tie: bool = True, seed: int = 0) -> Path:
    """A tiny AR base model directory with a real tokenizer."""
    save_tiny_model(directory, family, seed=seed, vocab_size=VOCAB, tie=tie)
    make_tiny_tokenizer(directory)
    return directory


def make_dlm(tmp: Path, family: str = "qwen3", tie: bool = True, mask: str | int = "add", seed: int = 0,
             block: int = 8):
    """A DLM as training leaves it: mask token resolved (added or reserved id), head untied, weights moved."""
    from nemodiff_train.models.hf import load_dlm

    base = make_base(tmp / f"base-{family}-{tie}-{mask}-{seed}", family, tie, seed)
    dlm = load_dlm(base, mask_token=None if mask == "add" else int(mask),
                   settings={"train_block_size": 2 * block, "inference_block_size": block})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # "training": every weight moves, the head away from the embedding
        for p in dlm.hf.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    dlm.hf.eval()
    return dlm


def run_config(recipe: str = "export_test", block: int = 8):
    from nemodiff_train.config.schema import Config, DataConfig, DiffusionConfig, StageConfig

    return Config(recipe=recipe, diffusion=DiffusionConfig(block_size=2 * block, inference_block_size=block),
                  stages=[StageConfig(name="pretrain", kind="pretrain", steps=6, global_batch_size=4,
                                      micro_batch_size=2,
                                      data=DataConfig(kind="pretrain", seq_len=32,
                                                      sources=["embedded:pretrain_train.jsonl.gz"]))])


def write_hf_base(run: Path, dlm, cfg) -> Path:
    """``<run>/hf_base`` as the trainer writes it (config + DLM settings, tokenizer, generation config)."""
    out = run / "hf_base"
    out.mkdir(parents=True, exist_ok=True)
    d = cfg.diffusion
    config = dlm.hf.config.__class__.from_dict(dlm.hf.config.to_dict())
    config.nemodiff = {
        "mask_token_id": dlm.settings.mask_token_id, "train_block_size": d.block_size,
        "inference_block_size": d.inference_block_size, "attention_pattern": d.pattern, "alpha": d.alpha,
        "beta": d.beta, "noise_schedule": d.schedule, "recipe": cfg.recipe, "base_model": "acme/tiny-base",
        "stages": [{"name": s.name, "kind": s.kind, "steps": s.steps, "sources": list(s.data.sources),
                    "seq_len": s.data.seq_len, "global_batch_size": s.global_batch_size} for s in cfg.stages]}
    config.save_pretrained(out)
    dlm.hf.generation_config.save_pretrained(out)
    if dlm.tokenizer is not None:
        dlm.tokenizer.save_pretrained(out)
    return out


def save_dcp(ckpt: Path, state_dict: dict, step: int, tokens: int | None = None, complete: bool = True) -> Path:
    """One checkpoint directory: DCP shards of ``{"model": state_dict}``, trainer_state.json, COMPLETE."""
    import torch.distributed.checkpoint as dcp

    ckpt.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: single-process save"
        dcp.save({"model": state_dict, "rng": {"seed": torch.tensor([0])}}, checkpoint_id=str(ckpt))
    (ckpt / "trainer_state.json").write_text(json.dumps(
        {"step": step, "tokens": tokens if tokens is not None else step * 4 * 32, "stage": 0}))
    if complete:
        (ckpt / "COMPLETE").write_text("")
    return ckpt


def make_run_dir(root: Path, dlm, step: int = 6, cfg=None, with_config: bool = True) -> Path:
    """A run directory holding ``dlm``'s weights as its only checkpoint (step ``step``)."""
    from nemodiff_train.config.load import save_config

    cfg = cfg or run_config(block=dlm.settings.inference_block_size)
    root.mkdir(parents=True, exist_ok=True)
    if with_config:
        save_config(cfg, root / "config.yaml")
    write_hf_base(root, dlm, cfg)
    save_dcp(root / "checkpoints" / f"step_{step:08d}", dict(dlm.hf.state_dict()), step)
    return root


def tree(path: Path) -> list[str]:
    """Every path under ``path`` (to assert that a failed export wrote nothing)."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))
