"""What a run needs before its first step: the model (local, embedded or from the Hub) and prepared data."""

from __future__ import annotations

from pathlib import Path

import torch

from ...assets.resolve import EMBEDDED, resolve_model_path  # noqa: F401  (shared with the Megatron engine, the CLI)
from ...assets.resolve import resolve_data_source as resolve_source
from ...config.schema import Config
from ...models.hf import DLMModel, load_dlm
from .distributed import DistEnv
from .main_work import MainWork

__all__ = ["resolve_model_path", "build_model", "prepare_stage_data", "resolve_source"]


def build_model(cfg: Config, run_dir: Path, env: DistEnv, work: MainWork) -> DLMModel:
    """Load the AR checkpoint as a float32 DLM (master weights); rank 0 records it in ``<run>/hf_base``.

    Every node resolves ``model.path`` itself (its local rank 0 downloads a Hub model into that
    node's cache while the node's other ranks wait on a file): a path in rank 0's cache may not exist
    on another node. Under FSDP2 with several ranks the model is loaded on the CPU and each layer
    moves to the GPU as it is sharded (:mod:`.parallelize`); otherwise it is loaded onto the device.
    The compute dtype (``model.dtype``) is applied by :mod:`.parallelize`, never to the weights.
    """
    m = cfg.model
    mask = m.mask_token_id if m.mask_token_id is not None else m.mask_token
    attn = m.attn_implementation  # None: load_dlm picks what the architecture supports (flex on CUDA, sdpa, eager)
    path = Path(work.run("model", lambda: str(resolve_model_path(m.path)), per_node=True))
    shard_later = env.world_size > 1 and cfg.engine.distributed == "fsdp2"
    d = cfg.diffusion
    dlm = load_dlm(path, mask_token=mask, untie_head=m.untie_head, dtype=torch.float32, attn_implementation=attn,
                   device="cpu" if shard_later else env.device,
                   settings={"train_block_size": d.block_size, "inference_block_size": d.inference_block_size,
                             "attention_pattern": d.pattern})
    dlm.hf.train()
    work.run("hf_base", lambda: _save_base(dlm, cfg, run_dir / "hf_base", source=path))
    return dlm


def _save_base(dlm: DLMModel, cfg: Config, out: Path, source: Path) -> None:
    """Config + tokenizer + generation config of the DLM-ified architecture (no weights)."""
    out.mkdir(parents=True, exist_ok=True)
    d = cfg.diffusion
    dlm.hf.config.nemodiff = {
        "mask_token_id": dlm.settings.mask_token_id, "train_block_size": d.block_size,
        "inference_block_size": d.inference_block_size, "attention_pattern": d.pattern, "alpha": d.alpha,
        "beta": d.beta, "noise_schedule": d.schedule, "recipe": cfg.recipe, "base_model": cfg.model.hub_id or cfg.model.path,
        "stages": [{"name": s.name, "kind": s.kind, "steps": s.steps, "sources": list(s.data.sources),
                    "seq_len": s.data.seq_len, "global_batch_size": s.global_batch_size} for s in cfg.stages],
    }
    dlm.hf.config.save_pretrained(out)
    if dlm.hf.generation_config is not None:
        dlm.hf.generation_config.save_pretrained(out)
    if dlm.tokenizer is not None:
        dlm.tokenizer.save_pretrained(out)
    (out / "SOURCE").write_text(str(source) + "\n")


def prepare_stage_data(cfg: Config, stage_index: int, run_dir: Path, work: MainWork):
    """Tokenize + pack the stage's sources once (rank 0; idempotent), then open train/val memory maps."""
    from ...data.packed import PackedDataset
    from ...data.prepare import DataPrepConfig, prepare
    from ...data.sources import SourceSpec

    stage = cfg.stages[stage_index]
    dc = stage.data
    out = Path(dc.prepared_dir) if dc.prepared_dir else run_dir / "data" / stage.name

    def specs(items):
        return [SourceSpec.parse(resolve_source(s), text_field=dc.text_field, messages_field=dc.messages_field)
                for s in items]

    def _prepare() -> None:
        prepare(DataPrepConfig(kind=dc.kind, sources=specs(dc.sources), val_sources=specs(dc.val_sources),
                               tokenizer=str(run_dir / "hf_base"), seq_len=dc.seq_len, out=str(out),
                               val_fraction=dc.val_fraction, num_proc=dc.num_proc, seed=cfg.run.seed,
                               pack=dc.pack, max_documents=dc.max_documents,
                               max_bad_fraction=dc.max_bad_fraction))

    work.run(f"data_{stage_index}", _prepare)  # the other ranks wait on a file, not on a collective
    train_ds = PackedDataset(out, "train")
    try:
        val_ds = PackedDataset(out, "val")
    except Exception:
        val_ds = None
    return train_ds, val_ds
