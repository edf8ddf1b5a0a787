"""Context parallelism's row split: the zigzag covers the row once, balances the two-stream mask's
(query, key) pairs, and the sliced mask / loss parts add up to the whole row's (one process; the
multi-process equality with the one-rank step is tests/integration/test_context_parallel.py)."""

from __future__ import annotations

import pytest
import torch

from nemodiff_train.core.context_split import RowSplit, zigzag_chunks
from nemodiff_train.core.losses import joint_loss_parts
from nemodiff_train.core.masks import SequenceLayout, dense_mask

pytestmark = pytest.mark.unit


def test_zigzag_by_hand():
    # L = 8, cp = 2: each stream in 4 chunks of 2; rank 0 keeps chunks 0 and 3, rank 1 chunks 1 and 2
    assert RowSplit(8, 2, 0).positions().tolist() == [0, 1, 6, 7, 8, 9, 14, 15]
    assert RowSplit(8, 2, 1).positions().tolist() == [2, 3, 4, 5, 10, 11, 12, 13]
    assert zigzag_chunks(4, 1) == (1, 6)


@pytest.mark.parametrize("seq_len,cp", [(8, 1), (8, 2), (24, 3), (32, 4), (64, 8)])
def test_split_covers_the_row_once_and_inverts(seq_len, cp):
    split = RowSplit(seq_len, cp, 0)
    order = split.gathered_order()
    assert sorted(order.tolist()) == list(range(2 * seq_len))
    assert torch.equal(order[split.to_row_order()], torch.arange(2 * seq_len))
    for r in range(cp):
        pos = RowSplit(seq_len, cp, r).positions()
        assert pos.numel() == split.local_len
        assert (pos[: pos.numel() // 2] < seq_len).all() and (pos[pos.numel() // 2:] >= seq_len).all()


def test_split_refuses_unequal_chunks():
    with pytest.raises(ValueError, match="divisible by 2·engine.cp"):
        RowSplit(30, 4, 0)
    with pytest.raises(ValueError, match="outside a context-parallel group"):
        RowSplit(32, 2, 2)


def _pairs_per_rank(mask: torch.Tensor, rows_of_rank) -> list[int]:
    """Allowed (query, key) pairs in the query rows each rank holds: its attention work."""
    return [int(mask[rows].sum()) for rows in rows_of_rank]


@pytest.mark.parametrize("pattern", ["two_stream", "bd3"])
@pytest.mark.parametrize("cp", [2, 4, 8])
def test_zigzag_balances_the_two_stream_mask(pattern, cp):
    """The cost model (docs/context_parallel.md): a query's keys grow linearly with its position in its
    stream, in both streams, so mirrored chunks pair up to equal work. Measured on the mask itself."""
    seq_len, block = 512, 32
    mask = dense_mask(pattern, SequenceLayout(seq_len, block))[0, 0]
    zigzag = _pairs_per_rank(mask, [RowSplit(seq_len, cp, r).positions() for r in range(cp)])
    assert sum(zigzag) == int(mask.sum())
    assert max(zigzag) == min(zigzag), zigzag  # exactly equal when B divides the chunks
    # what the zigzag avoids: each stream cut into contiguous slices loads the last rank 1.4-1.9x the mean
    contiguous = _pairs_per_rank(mask, [_contiguous(seq_len, cp, r) for r in range(cp)])
    assert max(contiguous) / (sum(contiguous) / cp) > 1.4


def _contiguous(seq_len: int, cp: int, r: int) -> torch.Tensor:
    """Each stream cut into cp contiguous slices (what the zigzag replaces)."""
    n = seq_len // cp
    own = torch.arange(r * n, (r + 1) * n)
    return torch.cat([own, own + seq_len])


def test_zigzag_balance_with_blocks_across_chunks_and_documents():
    """Blocks larger than a chunk: still exactly even. Packed documents: a query's work then grows with
    its position in its DOCUMENT, so no fixed split is exact and one layout can favour either split;
    over seeded random packings (exponential document lengths, mean 128) the zigzag's busiest rank is
    less loaded on average (docs/context_parallel.md gives the measured spread)."""
    import random

    seq_len, cp = 512, 8  # chunks of 32 positions, blocks of 128
    mask = dense_mask("two_stream", SequenceLayout(seq_len, 128))[0, 0]
    work = _pairs_per_rank(mask, [RowSplit(seq_len, cp, r).positions() for r in range(cp)])
    assert max(work) == min(work), work
    cp, imbalance = 4, {"zigzag": [], "contiguous": []}
    for seed in range(8):
        rng, lengths = random.Random(seed), []
        while sum(lengths) < seq_len:
            lengths.append(max(1, int(rng.expovariate(1 / 128))))
        lengths[-1] -= sum(lengths) - seq_len
        docs = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
        mask = dense_mask("two_stream", SequenceLayout(seq_len, 32, docs))[0, 0]
        for name, rows in (("zigzag", lambda r: RowSplit(seq_len, cp, r).positions()),
                           ("contiguous", lambda r: _contiguous(seq_len, cp, r))):
            work = _pairs_per_rank(mask, [rows(r) for r in range(cp)])
            assert sum(work) == int(mask.sum())
            imbalance[name].append(max(work) / (sum(work) / cp))
    mean = {k: sum(v) / len(v) for k, v in imbalance.items()}
    assert mean["zigzag"] < mean["contiguous"], mean


@pytest.mark.parametrize("window", [None, 5])
def test_mask_rows_of_a_slice_are_the_whole_masks_rows(window):
    docs = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 16])
    layout = SequenceLayout(16, 4, docs)
    whole = dense_mask("two_stream", layout, window=window)
    rows = RowSplit(16, 2, 1).positions()
    assert torch.equal(dense_mask("two_stream", layout, window=window, query_index=rows), whole[:, :, rows])
    with pytest.raises(ValueError, match="query_index must lie"):
        dense_mask("two_stream", layout, query_index=torch.tensor([32]))


def test_loss_parts_of_the_slices_add_up_to_the_rows():
    """Targets, weights and counts come from the whole row (AR targets cross chunk edges), so the
    ranks' parts sum to the one-rank parts."""
    torch.manual_seed(0)
    b, seq_len, vocab, cp = 2, 16, 11, 4
    x0 = torch.randint(0, vocab, (b, seq_len))
    masked = torch.rand(b, seq_len) < 0.5
    prob = torch.rand(b, seq_len) * 0.9 + 0.1
    loss_mask = torch.ones(b, seq_len, dtype=torch.bool)
    loss_mask[1, :5] = False
    docs = torch.tensor([[0] * 7 + [1] * 9, [0] * 16])
    hidden = torch.randn(b, 2 * seq_len, vocab)
    whole = joint_loss_parts(hidden, lambda h: h, x0, masked, prob, loss_mask, docs)
    sliced = [joint_loss_parts(hidden[:, pos], lambda h: h, x0, masked, prob, loss_mask, docs, positions=pos)
              for pos in (RowSplit(seq_len, cp, r).positions() for r in range(cp))]
    for field in ("diffusion_sum", "diffusion_count", "ar_sum", "ar_count"):
        total = sum(getattr(p, field) for p in sliced)
        assert torch.allclose(total, getattr(whole, field), rtol=1e-6), field
    with pytest.raises(ValueError, match="len\\(positions\\)"):
        joint_loss_parts(hidden, lambda h: h, x0, masked, prob, loss_mask, docs, positions=torch.arange(4))


def test_engine_mesh_refuses_a_world_cp_does_not_divide():
    from nemodiff_train.config.errors import ConfigError
    from nemodiff_train.engines.torch.context import ParallelDims, parallel_dims
    from nemodiff_train.engines.torch.distributed import DistEnv

    with pytest.raises(ConfigError, match="world size 3 is not a multiple"):
        parallel_dims(DistEnv(rank=0, world_size=3, local_rank=0, device=torch.device("cpu")), 2)
    one = parallel_dims(DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), 1)
    assert (one.dp, one.cp, one.shard(32)) == (1, 1, None)
    with pytest.raises(ConfigError, match="engine.cp=2: .*divisible by 2·engine.cp"):
        ParallelDims(dp=1, cp=2, dp_rank=0, cp_rank=1).shard(30)


def test_a_forward_that_gathers_no_keys_is_refused():
    """An attention module that bypasses transformers' attention interface (here: SDPA called directly,
    the mask cut to the local keys, which would run silently wrong) never gathers the other ranks' keys;
    the context-parallel forward counts the gathers and refuses it, naming the model."""
    import torch.nn.functional as F

    from nemodiff_train.models.attention import UnsupportedModelError
    from nemodiff_train.models.context_parallel import ContextShard, use_cp_attention
    from nemodiff_train.models.hf import DLMModel, DLMSettings
    from tests.helpers.arch_matrix import arch_model

    dlm = DLMModel(arch_model("llama_untied"), DLMSettings(mask_token_id=95, train_block_size=4))
    use_cp_attention(dlm.hf)

    def local_only(self, hidden_states, position_embeddings, attention_mask, **kwargs):
        b, q, _ = hidden_states.shape
        qs, ks, vs = (proj(hidden_states).view(b, q, -1, self.head_dim).transpose(1, 2)
                      for proj in (self.q_proj, self.k_proj, self.v_proj))
        ks, vs = (x.repeat_interleave(self.num_key_value_groups, dim=1) for x in (ks, vs))
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=attention_mask[..., :q])
        return self.o_proj(out.transpose(1, 2).reshape(b, q, -1)), None

    for layer in dlm.backbone.layers:
        layer.self_attn.forward = local_only.__get__(layer.self_attn)
    shard = ContextShard.build(RowSplit(16, 2, 0), group=None, device=torch.device("cpu"))
    ids = torch.randint(3, 90, (1, 16))
    with pytest.raises(UnsupportedModelError, match=r"0 key/value gathers .* \(expected 4\)"):
        dlm.two_stream_hidden(ids, ids, None, 4, shard=shard)


def test_dense_mask_built_in_row_slices_is_the_same_mask(monkeypatch):
    """Long rows build the mask a slice of query rows at a time (bounded intermediates): same mask."""
    import nemodiff_train.core.masks as masks

    docs = torch.tensor([[0] * 9 + [1] * 15 + [2] * 8, [0] * 32])
    layout = SequenceLayout(32, 4, docs)
    whole = dense_mask("bd3", layout, window=6)
    rows = RowSplit(32, 4, 3).positions()
    monkeypatch.setattr(masks, "_MASK_SLICE_ELEMENTS", 3 * 2 * 64)  # three query rows per slice
    assert torch.equal(dense_mask("bd3", layout, window=6), whole)
    assert torch.equal(dense_mask("bd3", layout, window=6, query_index=rows), whole[:, :, rows])
