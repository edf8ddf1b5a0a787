"""The Megatron engine's context parallelism against cp = 1, on the same weights and batch (2 processes).

    python -m tests.megatron.support.cp_check --work DIR --out result.json [--nccl]

Spawns two processes (gloo on CPU; ``--nccl`` on two GPUs). Each builds the Megatron model of a tiny
Qwen3 (Megatron's ``GPTModel``: the forward step slices the row) and of a tiny Ministral-3 (the
multimodal wrapper, which slices the row itself) with the engine's own provider (:func:`nemodiff_train.engines.megatron.model.build_provider`,
HF weights loaded) and runs the engine's forward step and loss function
(:class:`nemodiff_train.engines.megatron.step.TwoStreamForwardStep`) on the same micro-batch, twice:

1. ``context_parallel_size=2``: each rank holds half of every ``[x_t ; x_0]`` row in Megatron's order;
   numerators, token counts, reports and parameter gradients are summed over the CP group (what
   Megatron's ``dp_cp`` reductions do);
2. ``context_parallel_size=1`` (the two processes are then two data-parallel replicas of the same
   batch): the whole row on one rank.

Rank 0 writes both results per family and their largest gradient differences to ``--out``; it judges nothing
(tests/megatron/test_megatron_context_parallel.py asserts). Separate processes: Megatron's parallel
state is global.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import traceback
from pathlib import Path


def _sample(vocab: int, b: int = 2, length: int = 32):
    import torch

    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(11, vocab, (b, length), generator=g)
    doc = torch.zeros(b, length, dtype=torch.long)
    doc[0, 12:] = 1
    doc[1, 20:] = 1
    doc[1, 27:] = 2
    loss_mask = torch.ones(b, length, dtype=torch.bool)
    loss_mask[1, :5] = False
    return {"tokens": x0, "doc_ids": doc, "loss_mask": loss_mask, "sample_index": torch.arange(10, 10 + b),
            "noise_seed": torch.zeros(b, dtype=torch.long)}


def _one_setting(cfg, hf_dir: Path, cp: int, device):
    """Loss parts and gradients of one forward/backward at ``context_parallel_size=cp``, summed over CP."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from nemodiff_train.engines.megatron.model import auto_bridge, build_provider
    from nemodiff_train.engines.megatron.step import TwoStreamForwardStep

    parallel_state.initialize_model_parallel(context_parallel_size=cp)
    try:
        cfg.engine.cp = cp
        bridge = auto_bridge(hf_dir=hf_dir)
        model = build_provider(cfg, bridge, 0, cpu=device.type == "cpu").provide_distributed_model(
            wrap_with_ddp=False, use_cpu_initialization=True)
        bridge.load_hf_weights(model)
        net = model[0].to(device)
        d = cfg.diffusion
        step = TwoStreamForwardStep(mask_token_id=cfg.model.mask_token_id, schedule=d.schedule, eps=d.eps,
                                    block_size=d.block_size, half_life_ratio=d.half_life_ratio, alpha=d.alpha,
                                    beta=d.beta)
        out, loss_func = step(None, iter([_sample(96)]), net)
        if isinstance(out, tuple):  # multimodal wrappers return (output, loss_mask)
            out = out[0]
        num, count, report = loss_func(out)
        num.backward()
        group = parallel_state.get_context_parallel_group()
        sums = torch.cat([num.detach().double().view(1), count.double().view(1),
                          *[v.double().view(-1) for v in report.values()]])
        dist.all_reduce(sums, group=group)
        grads = {}
        for name, p in net.named_parameters():
            g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g, group=group)
            grads[name] = g.cpu()
        keys = ["num", "count"] + [f"{k}.{part}" for k in report for part in ("sum", "count")]
        return dict(zip(keys, sums.tolist())), grads, list(out.shape)
    finally:
        parallel_state.destroy_model_parallel()


def _compare(cfg, hf_dir: Path, device) -> dict:
    cp2, g2, shape2 = _one_setting(cfg, hf_dir, 2, device)
    cp1, g1, shape1 = _one_setting(cfg, hf_dir, 1, device)
    grad_diff = {n: float((g2[n] - g1[n]).abs().max()) for n in g1}
    grad_scale = {n: float(g1[n].abs().max()) for n in g1}
    return {"cp2": cp2, "cp1": cp1, "local_ce_shape_cp2": shape2, "ce_shape_cp1": shape1,
            "max_grad_abs_diff": max(grad_diff.values()), "max_grad_abs": max(grad_scale.values()),
            "params": len(g1), "trained_params": sum(1 for n in g1 if grad_scale[n] > 0)}


def _worker(rank: int, world: int, port: int, work: str, out: str, nccl: bool):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), WANDB_MODE="disabled")
    from . import import_megatron

    import_megatron(compile_fusions=False)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if nccl else torch.device("cpu")
    if nccl:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if nccl else "gloo", rank=rank, world_size=world)
    result = {"ok": False}
    try:
        from nemodiff_train.config.load import compose
        from tests.helpers.tiny_models import save_tiny_model

        hf_dir = Path(work) / "qwen3"
        if rank == 0:
            save_tiny_model(hf_dir, "qwen3", tie=False, initializer_range=0.3)
        dist.barrier()
        result = {"ok": True, "backend": dist.get_backend()}
        for family, src in (("qwen3", hf_dir), ("ministral3", Path(work) / "ministral3")):
            cfg = compose(["recipe=tiny_cpu", "engine=megatron", "engine.device=cpu", f"run.dir={work}/run_{family}",
                           "model.mask_token_id=5", f"model.path={src}", "diffusion.block_size=4"])
            if family == "ministral3":
                from nemodiff_train.engines.megatron.model import prepare_init_checkpoint
                from tests.megatron.test_megatron_model_parity import _tiny_ministral3

                if rank == 0:
                    _tiny_ministral3(src)
                dist.barrier()
                src = prepare_init_checkpoint(cfg, Path(work) / f"run_{family}", rank == 0, src=src)
                dist.barrier()
            result[family] = _compare(cfg, src, device)
    except Exception as e:  # reported, judged by the test
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    finally:
        if rank == 0:
            Path(out).write_text(json.dumps(result, indent=1))
        dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--nccl", action="store_true", help="two CUDA devices with NCCL instead of gloo on CPU")
    a = p.parse_args()
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, a.work, a.out, a.nccl), nprocs=2, join=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
