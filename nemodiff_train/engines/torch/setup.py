"""What a run needs before its first step: the model (local, embedded or from the Hub) and prepared data."""

from __future__ import annotations

from pathlib import Path

import torch

from ... import runs
from ...assets.resolve import resolve_model_path
from ...config.schema import Config
from ...models.hf import DLMModel, load_dlm
from .distributed import DistEnv
from .main_work import MainWork

__all__ = ["build_model", "build_teacher", "prepare_stage_data"]


def _base_path(cfg: Config, work: MainWork) -> Path:
    """``model.path`` at ``model.revision`` as a local directory (resolved once per node: the worker's
    result file is what the node's other ranks read)."""
    m = cfg.model
    return Path(work.run("model", lambda: str(resolve_model_path(m.path, m.revision)), per_node=True))


def _mask_token(cfg: Config) -> int | str:
    m = cfg.model
    return m.mask_token_id if m.mask_token_id is not None else m.mask_token


def build_model(cfg: Config, run_dir: Path, env: DistEnv, work: MainWork) -> DLMModel:
    """Load the AR checkpoint as a float32 DLM (master weights); rank 0 records it in ``<run>/hf_base``.

    Every node resolves ``model.path`` itself (its local rank 0 downloads a Hub model into that
    node's cache while the node's other ranks wait on a file): a path in rank 0's cache may not exist
    on another node. Under FSDP2 with several ranks the model is loaded on the CPU and each layer
    moves to the GPU as it is sharded (:mod:`.parallelize`); otherwise it is loaded onto the device.
    The compute dtype (``model.dtype``) is applied by :mod:`.parallelize`, never to the weights.
    """
    m = cfg.model
    attn = m.attn_implementation  # None: load_dlm picks what the architecture supports (flex on CUDA, sdpa, eager)
    path = _base_path(cfg, work)
    if cfg.engine.cp > 1 and attn is None:  # context parallelism wraps sdpa or eager (models/context_parallel.py)
        from transformers import AutoConfig

        from ...models.arch import pick_attn_implementation

        attn = pick_attn_implementation(AutoConfig.from_pretrained(path), "cpu")  # sdpa, else eager (Gemma-2)
    shard_later = env.world_size > 1 and cfg.engine.distributed == "fsdp2"
    d = cfg.diffusion
    # a frozen base keeps its head as it is (tied or not): an untied copy would only cost memory
    untie = m.untie_head and cfg.adapter.name == "none"
    dlm = load_dlm(path, mask_token=_mask_token(cfg), untie_head=untie, dtype=torch.float32, attn_implementation=attn,
                   device="cpu" if shard_later else env.device,
                   settings={"train_block_size": d.block_size, "inference_block_size": d.inference_block_size,
                             "attention_pattern": d.pattern})
    if cfg.adapter.name == "lora":
        _add_adapter(dlm, cfg, path)
    dlm.hf.train()
    work.run("hf_base", lambda: _save_base(dlm, cfg, run_dir / runs.HF_BASE_DIR, source=path))
    return dlm


def build_teacher(cfg: Config, env: DistEnv, work: MainWork) -> DLMModel | None:
    """The frozen teacher of ``diffusion.teacher_kl`` (the untouched base at ``model.path``), or None.

    A second full copy of the base on every rank, in the compute dtype, never sharded or wrapped: it only
    runs one causal forward per micro-batch without gradient (docs/method.md, "Soft-target terms").
    """
    if cfg.diffusion.teacher_kl <= 0:
        return None
    m = cfg.model
    dtype = torch.bfloat16 if m.dtype == "bfloat16" and env.device.type == "cuda" else torch.float32
    # the same base as the student's, at the same pinned revision (model.revision)
    teacher = load_dlm(_base_path(cfg, work), mask_token=_mask_token(cfg), untie_head=False, dtype=dtype,
                       attn_implementation=m.attn_implementation,
                       device=env.device, settings={"train_block_size": cfg.diffusion.block_size})
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _add_adapter(dlm: DLMModel, cfg: Config, path: Path) -> None:
    """Freeze the base and attach the drafter adapter (``adapter=lora``).

    The mask token must already be a row of the base: adding one would grow the base's embedding and
    head, and the base would no longer be the untouched checkpoint.
    """
    import json

    from ...config.errors import ConfigError

    base_rows = json.loads((path / "config.json").read_text()).get("vocab_size")
    rows = dlm.hf.get_input_embeddings().weight.shape[0]
    if base_rows is not None and rows != int(base_rows):
        raise ConfigError(f"adapter=lora: the mask token {cfg.model.mask_token!r} is not in {path}'s vocabulary, so "
                          "it would be added and the frozen base would change; give a reserved id of the base "
                          "instead (model.mask_token_id=<id>)")
    a = cfg.adapter
    dlm.add_adapter(rank=a.rank, alpha=a.alpha, dropout=a.dropout, target_modules=tuple(a.target_modules))


def _save_base(dlm: DLMModel, cfg: Config, out: Path, source: Path) -> None:
    """Config + tokenizer + generation config of the DLM-ified architecture (no weights)."""
    out.mkdir(parents=True, exist_ok=True)
    dlm.hf.config.nemodiff = runs.run_record(cfg, dlm.settings.mask_token_id)
    dlm.hf.config.save_pretrained(out)
    if dlm.hf.generation_config is not None:
        dlm.hf.generation_config.save_pretrained(out)
    if dlm.tokenizer is not None:
        dlm.tokenizer.save_pretrained(out)
    (out / "SOURCE").write_text(str(source) + "\n")


def prepare_stage_data(cfg: Config, stage_index: int, run_dir: Path, work: MainWork, dlm: DLMModel | None = None):
    """Tokenize + pack the stage's sources once (rank 0; idempotent), then open train/val memory maps.

    ``dlm``: the model being trained, with its current weights: the teacher of a ``distill`` stage with
    ``teacher: current`` (docs/distill.md). Rank 0 generates with it alone, so its parameters must be whole
    on rank 0: FSDP2 with several ranks is refused (DDP replicates them).
    """
    from ...data.packed import PackedDataset
    from ...data.stage import prepare_stage, stage_dir

    data = cfg.stages[stage_index].data
    current = data.kind == "distill" and data.distill.teacher == "current"
    if current and work.env.world_size > 1 and cfg.engine.distributed == "fsdp2":
        from ...config.errors import ConfigError

        raise ConfigError(f"stages.{stage_index}.data.distill.teacher: 'current' generates on rank 0 with the whole "
                          "model, but engine.distributed=fsdp2 shards it across ranks; use engine.distributed=ddp "
                          "for this stage's run, or teacher: base")

    def _prepare() -> None:
        prepare_stage(cfg, stage_index, run_dir, tokenizer=run_dir / runs.HF_BASE_DIR,
                      teacher_model=dlm if current else None)

    work.run(f"data_{stage_index}", _prepare)  # the other ranks wait on a file, not on a collective
    out = stage_dir(cfg, stage_index, run_dir)
    train_ds = PackedDataset(out, "train")
    try:
        val_ds = PackedDataset(out, "val")
    except Exception:
        val_ds = None
    return train_ds, val_ds
