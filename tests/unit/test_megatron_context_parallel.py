"""The Megatron engine's context parallelism in pure PyTorch (no Megatron): Megatron's split order, the
local mask rows against the one-rank dense mask, the attention of every rank's queries against the
dense one-rank attention, the cost balance of the split, and the K/V all-gather's backward over gloo."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F

from nemodiff_train.core.masks import SequenceLayout, dense_mask, get_pattern
from nemodiff_train.engines.megatron.context_parallel import (check_cp_length, cp_positions, gather_for_cp,
                                                              local_mask_rows, split_for_cp)

pytestmark = pytest.mark.unit


def _docs(b: int, length: int) -> torch.Tensor:
    doc = torch.zeros(b, length, dtype=torch.long)
    doc[0, length // 3:] = 1
    doc[-1, length // 2:] = 1
    doc[-1, 3 * length // 4 + 1:] = 2
    return doc


def test_split_order_is_megatrons_zigzag():
    """2·cp chunks, rank r holds chunk r then chunk 2cp-1-r (megatron-core 0.19.2's per-sequence split)."""
    assert cp_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert cp_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    for cp in (1, 2, 4):
        held = torch.cat([cp_positions(64, cp, r) for r in range(cp)])
        assert sorted(held.tolist()) == list(range(64))  # a partition of the row
    x = torch.arange(24).view(1, 24)
    assert split_for_cp(x, 3, 1).tolist() == [[4, 5, 6, 7, 16, 17, 18, 19]]
    with pytest.raises(ValueError, match="multiple of engine.cp=3"):
        check_cp_length(32, 3)
    with pytest.raises(ValueError, match="2·cp"):
        cp_positions(10, 2, 0)


@pytest.mark.parametrize("pattern", ["two_stream", "bd3"])
@pytest.mark.parametrize("packed", [False, True])
def test_local_rows_are_the_dense_masks_rows(pattern, packed):
    length, block, b, cp = 24, 4, 2, 3
    layout = SequenceLayout(length, block, _docs(b, length) if packed else None)
    full = dense_mask(pattern, layout, b)
    for r in range(cp):
        pos = cp_positions(2 * length, cp, r)
        assert torch.equal(local_mask_rows(pattern, layout, pos, b), full[:, :, pos, :])


def test_every_ranks_attention_is_the_one_rank_attention():
    """Local queries (RoPE'd at their global positions), all keys/values, local mask rows → the rows of
    the one-rank SDPA output, for GQA."""
    torch.manual_seed(0)
    length, block, b, cp = 16, 4, 2, 2
    layout = SequenceLayout(length, block, _docs(b, length))
    q, k, v = torch.randn(b, 4, 2 * length, 8), torch.randn(b, 2, 2 * length, 8), torch.randn(b, 2, 2 * length, 8)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask("two_stream", layout), enable_gqa=True)
    for r in range(cp):
        pos = cp_positions(2 * length, cp, r)
        local_q = split_for_cp(q, cp, r, dim=2)
        mask = local_mask_rows("two_stream", layout, pos, b)
        out = F.scaled_dot_product_attention(local_q, k, v, attn_mask=mask, enable_gqa=True)
        assert torch.allclose(out, ref[:, :, pos], atol=1e-6)


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile.*")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flex_local_block_mask_attends_like_the_dense_rows():
    """The flex ``BlockMask`` of the local rows (Q_LEN = S/cp, KV_LEN = S) gives the dense rows' attention
    (eager flex-attention, forward: CPU has no flex backward); tile 8, so several tiles are skipped."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    length, block, b, cp = 32, 4, 2, 2
    layout = SequenceLayout(length, block, _docs(b, length))
    pos = cp_positions(2 * length, cp, 1)
    bm = local_mask_rows("two_stream", layout, pos, b, flex=True, device="cpu", tile=8)
    assert bm.shape[-2:] == (2 * length // cp, 2 * length)
    q, k, v = torch.randn(b, 2, length, 8), torch.randn(b, 2, 2 * length, 8), torch.randn(b, 2, 2 * length, 8)
    with torch.no_grad():
        out = flex.flex_attention(q, k, v, block_mask=bm)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=local_mask_rows("two_stream", layout, pos, b))
    assert torch.allclose(out, ref, atol=1e-5)


def test_split_balances_the_two_stream_cost():
    """Allowed (query, key) pairs per rank (the cost model of docs/long_context.md) are within 10 %."""
    length, block = 512, 16
    layout = SequenceLayout(length, block)
    full = dense_mask("two_stream", layout)[0, 0]
    for cp in (2, 4, 8):
        work = [int(full[cp_positions(2 * length, cp, r)].sum()) for r in range(cp)]
        assert max(work) <= 1.1 * min(work), (cp, work)
    contiguous = [int(full[r * length // 2:(r + 1) * length // 2].sum()) for r in range(4)]
    assert max(contiguous) > 2 * min(contiguous)  # what the zigzag avoids


def _gather_worker(rank: int, world: int, port: int, out: dict):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        full = torch.randn(2, 3, 16, 4)  # [b, heads, S, hn], the same on every rank
        weight = torch.randn(2, 3, 16, 4)
        local = split_for_cp(full, world, rank, dim=2).clone().requires_grad_()
        gathered = gather_for_cp(local, dist.group.WORLD, dim=2)
        # every rank's "loss" reads the whole gathered tensor, scaled differently per rank
        ((gathered * weight).sum() * (rank + 1)).backward()
        out[rank] = (torch.equal(gathered.detach(), full), local.grad.clone())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gather_restores_global_order_and_reduce_scatters_gradients():
    """2 gloo processes: the gather is the whole row in order; each rank's gradient is the sum over ranks
    of the gradient of its own positions (Σ_r (r+1)·weight = 3·weight at those positions)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_gather_worker, args=(2, port, out), nprocs=2, join=True)
    torch.manual_seed(0)
    _full, weight = torch.randn(2, 3, 16, 4), torch.randn(2, 3, 16, 4)
    for rank in range(2):
        ok, grad = out[rank]
        assert ok
        assert torch.allclose(grad, 3 * split_for_cp(weight, 2, rank, dim=2))
