"""Multi-process (gloo, CPU) check of context parallelism against the one-rank step.

:func:`run_cases` runs in every process of a ``torch.multiprocessing.spawn`` group of ``world``
processes arranged as ``world/cp`` data-parallel × ``cp`` context-parallel ranks, through the torch
engine's own pieces (:func:`~nemodiff_train.engines.torch.context.parallel_dims`, :class:`TwoStreamLoss`
wrapped by :func:`parallelize`, :class:`JointObjective`). For every case each process also runs the
one-rank step itself (the whole global batch, no collective), then compares; rank 0 writes what it
measured to ``<out>/<case>.json`` for the test to assert on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

BLOCK, SEQ_LEN, GLOBAL_BATCH, MICRO = 8, 32, 4, 1
MASK_ID = 95


def _rows(packed: bool, seed: int) -> list[dict]:
    """Random rows of the global batch (the same in every process); SFT-like loss masks on half of them."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(GLOBAL_BATCH):
        ids = torch.randint(3, MASK_ID, (SEQ_LEN,), generator=g)
        if packed:  # documents of 5, 12, 9 and 6 tokens: boundaries inside blocks and inside CP chunks
            docs = torch.cat([torch.full((n,), d) for d, n in enumerate((5, 12, 9, 6))])
        else:
            docs = torch.zeros(SEQ_LEN, dtype=torch.long)
        loss_mask = torch.ones(SEQ_LEN, dtype=torch.bool)
        if i % 2:
            loss_mask[: 3 + i] = False  # a prompt: never masked, no AR target
        rows.append({"input_ids": ids, "doc_ids": docs, "loss_mask": loss_mask})
    return rows


def _dlm(case: dict):
    """The case's model; with ``adapter`` a drafter adapter whose LoRA pairs are moved off zero (so it
    changes the noisy stream's forward and every adapter parameter gets a gradient)."""
    from nemodiff_train.models.hf import DLMModel, DLMSettings
    from tests.helpers.arch_matrix import arch_model

    hf = arch_model(case["arch"], seed=0).train()  # sdpa, or eager where the architecture needs it (Gemma-2)
    dlm = DLMModel(hf, DLMSettings(mask_token_id=MASK_ID, train_block_size=BLOCK, attention_pattern=case["pattern"]))
    if case.get("adapter"):
        adapter = dlm.add_adapter(rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in adapter.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return dlm


def _trained(dlm) -> dict:
    """``{name: parameter}`` of what trains (the adapter's when one is attached)."""
    return {n: p for n, p in dlm.named_parameters() if p.requires_grad}


def _collate(rows, indices, schedule: str):
    from nemodiff_train.models.step import collate

    return collate([rows[i] for i in indices], indices, seed=11, mask_token_id=MASK_ID, schedule=schedule,
                   eps=1e-3, block_size=BLOCK, half_life_ratio=0.25)


def _reference(case: dict, rows):
    """One rank, the whole global batch: parts, the loss, gradients and hidden states."""
    from nemodiff_train.engines.torch.loss import TwoStreamLoss

    dlm = _dlm(case)
    mb = _collate(rows, list(range(GLOBAL_BATCH)), case["schedule"])
    module = TwoStreamLoss(dlm, BLOCK, chunk_size=16)
    parts = module(mb)
    loss = (0.3 * parts.diffusion_sum + parts.ar_sum) / (parts.diffusion_count + parts.ar_count)
    loss.backward()
    with torch.no_grad():
        hidden = dlm.two_stream_hidden(mb.noise.noisy_ids, mb.x0, mb.doc_ids, BLOCK)
    grads = {n: p.grad.clone() for n, p in _trained(dlm).items()}
    return parts.detached(), loss.detach(), grads, hidden


def _config(strategy: str, cp: int):
    from nemodiff_train.config.schema import Config

    cfg = Config()
    cfg.engine.distributed, cfg.engine.cp, cfg.engine.device = strategy, cp, "cpu"
    # FSDP2 runs with activation checkpointing: the recomputed layers gather keys again in backward
    cfg.model.gradient_checkpointing = strategy == "fsdp2"
    return cfg


def _cp_step(case: dict, rows, env, dims):
    """The engine's step under CP: this data rank's rows, this CP rank's slice, DDP/FSDP2 over all ranks."""
    from nemodiff_train.core.losses import LossWeights
    from nemodiff_train.engines.torch.batches import rank_positions
    from nemodiff_train.engines.torch.distributed import all_reduce_sum
    from nemodiff_train.engines.torch.loss import JointObjective, StepParts, TwoStreamLoss
    from nemodiff_train.engines.torch.parallelize import parallelize
    from nemodiff_train.models.context_parallel import use_cp_attention

    dlm = _dlm(case)
    use_cp_attention(dlm.hf)
    par = parallelize(TwoStreamLoss(dlm, BLOCK, chunk_size=16), _config(case["strategy"], dims.cp), env)
    objective = JointObjective(LossWeights(0.3, 1.0))
    micro = [dims.on_shard(_collate(rows, pos, case["schedule"]))
             for pos in rank_positions(0, GLOBAL_BATCH, dims.dp_rank, dims.dp, MICRO)]
    dens = all_reduce_sum(torch.tensor(objective.local_denominators(micro), dtype=torch.float64)).tolist()
    total = StepParts.zeros(env.device)
    hidden = []  # the decoder's output inside the wrapped forward (FSDP2 has gathered the parameters there)
    dlm.backbone.register_forward_hook(lambda module, args, out: hidden.append(out.last_hidden_state.detach()))
    for mb in micro:
        parts = par.module(mb)
        objective.backward_scalar(parts, dens, env.world_size).backward()
        total = total + parts.detached()
    grads = {}
    for n, p in _trained(dlm).items():
        g = p.grad
        grads[n] = g.full_tensor() if hasattr(g, "full_tensor") else g  # FSDP2: a DTensor shard
    return total.all_reduced(env.device), dens[0], grads, micro, hidden


def _compare(case, rows, env, dims) -> dict:
    import torch.distributed as dist

    from nemodiff_train.engines.torch.batches import rank_positions

    ref_parts, ref_loss, ref_grads, ref_hidden = _reference(case, rows)
    parts, den, grads, micro, hidden = _cp_step(case, rows, env, dims)
    # every local hidden row equals the one-rank row at its global position (both streams)
    hidden_diff = torch.zeros(())
    mine = rank_positions(0, GLOBAL_BATCH, dims.dp_rank, dims.dp, MICRO)
    for rows_of_micro, mb, h in zip(mine, micro, hidden):
        hidden_diff = torch.maximum(hidden_diff, (h - ref_hidden[rows_of_micro][:, mb.shard.positions]).abs().max())
    dist.all_reduce(hidden_diff, op=dist.ReduceOp.MAX)
    grad_scale = max(g.abs().max().item() for g in ref_grads.values())
    loss = (0.3 * parts.diffusion_sum + parts.ar_sum) / (parts.diffusion_count + parts.ar_count)
    return {
        "loss": loss.item(), "ref_loss": ref_loss.item(),
        "diffusion_sum": parts.diffusion_sum.item(), "ref_diffusion_sum": ref_parts.diffusion_sum.item(),
        "ar_sum": parts.ar_sum.item(), "ref_ar_sum": ref_parts.ar_sum.item(),
        "masked": parts.diffusion_count.item(), "ref_masked": ref_parts.diffusion_count.item(),
        "ar_count": parts.ar_count.item(), "ref_ar_count": ref_parts.ar_count.item(),
        "denominator": den, "grad_max_abs_diff": max((grads[n] - g).abs().max().item() for n, g in ref_grads.items()),
        "grad_scale": grad_scale, "hidden_max_abs_diff": hidden_diff.item(),
        "grad_names": sorted(n for n, g in grads.items() if g is not None) == sorted(ref_grads),
    }


def run_cases(rank: int, world: int, cp: int, port: int, cases: list[dict], out: str) -> None:
    """Entry point of each spawned process."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from nemodiff_train.engines.torch.context import parallel_dims
    from nemodiff_train.engines.torch.distributed import init_distributed

    env = init_distributed("cpu", timeout_s=300)
    dims = parallel_dims(env, cp)
    try:
        for case in cases:
            result = _compare(case, _rows(case["packed"], seed=3), env, dims)
            if rank == 0:
                (Path(out) / f"{case['name']}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
