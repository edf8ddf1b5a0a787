"""A two-stream forward over only the positions the loss reads (core/compaction.py) is exact.

The claim is checked against the whole-row forward it replaces: the same loss parts and the same
gradients for every parameter, on packed SFT-like rows (prompts never masked, some response blocks
left clean), with both two-stream patterns, both dense attention forms, with and without the drafter
adapter and the soft-target terms; and the rows must really have been shortened, so the test fails if
the compaction silently stops happening.
"""

from __future__ import annotations

import pytest
import torch

from nemodiff_train.core.compaction import Compaction, required_positions
from nemodiff_train.core.distill_losses import DistillWeights
from nemodiff_train.core.masks import SequenceLayout, dense_mask
from nemodiff_train.engines.torch.loss import SoftTargetTerm, TwoStreamLoss
from nemodiff_train.models.step import collate

pytestmark = pytest.mark.unit

L, B = 32, 8


def test_required_positions_follow_attention_to_a_fixed_point():
    # a chain: i attends to i + 1 only (and itself); from position 0 everything is needed, from 4 only 4, 5
    s = 6
    allowed = (torch.eye(s, dtype=torch.bool) | torch.eye(s, dtype=torch.bool).roll(1, dims=1)).unsqueeze(0).unsqueeze(0)
    allowed[0, 0, s - 1, 0] = False  # no wrap-around
    seeds = torch.zeros(1, s, dtype=torch.bool)
    seeds[0, 0] = True
    assert required_positions(allowed, seeds).all()
    seeds = torch.zeros(1, s, dtype=torch.bool)
    seeds[0, 4] = True
    assert required_positions(allowed, seeds)[0].tolist() == [False, False, False, False, True, True]


@pytest.mark.parametrize("pattern", ["two_stream", "bd3"])
def test_required_noisy_positions_are_the_blocks_holding_a_masked_token(pattern):
    """Counted independently from the mask: per document, every block with a masked token, all clean positions."""
    docs = torch.tensor([[0] * 13 + [1] * 19])
    masked = torch.zeros(1, L, dtype=torch.bool)
    masked[0, [2, 20]] = True  # document 0's first block, document 1's first block (positions 13-20)
    layout = SequenceLayout(L, B, docs)
    need = required_positions(dense_mask(pattern, layout), torch.cat([masked, torch.ones_like(masked)], 1))
    blocks = layout.block_ids()[0]
    expected = [bool((masked[0] & (docs[0] == docs[0, i]) & (blocks == blocks[i])).any()) for i in range(L)]
    assert need[0, :L].tolist() == expected and need[0, L:].all()
    assert [i for i in range(L) if expected[i]] == list(range(8)) + list(range(13, 21))


def test_compaction_gathers_masks_and_scatters_back():
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(3, 10, generator=g) < 0.5
    keep[2] = False  # a row with nothing kept still gets a (padding) slot
    comp = Compaction.of(keep)
    x = torch.randn(3, 10, 4, generator=g)
    back = comp.scatter(comp.gather(x))
    assert torch.equal(back, torch.where(keep.unsqueeze(-1), x, torch.zeros_like(x)))
    allowed = torch.rand(3, 1, 10, 10, generator=g) < 0.5
    sub = comp.mask(allowed)[:, 0]
    for r in range(3):
        kept = keep[r].nonzero().flatten()
        n = len(kept)
        assert torch.equal(sub[r, :n, :n], allowed[r, 0][kept][:, kept])
        assert not sub[r, :n, n:].any() and not sub[r, n:, :n].any()
        assert torch.equal(sub[r, n:, n:], torch.eye(sub.shape[1] - n, dtype=torch.bool))


def _sft_rows(dlm, seed: int):
    """Two packed rows of 32 tokens, two conversations each: an unmasked prompt, then a response."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(2):
        docs = torch.tensor([0] * 14 + [1] * 18)
        loss = torch.tensor([False] * 10 + [True] * 4 + [False] * 9 + [True] * 9)  # a first block of prompt only
        rows.append({"input_ids": torch.randint(10, 200, (L,), generator=g), "doc_ids": docs, "loss_mask": loss})
    return collate(rows, [2 * seed, 2 * seed + 1], seed=seed, mask_token_id=dlm.settings.mask_token_id,
                   schedule="position_dependent", eps=1e-3, block_size=B, half_life_ratio=0.25, keep_block_start=True)


def _parts_and_grads(module, mb):
    parts = module(mb)
    total = parts.diffusion_sum + parts.ar_sum + sum(s for s, _ in parts.extra.values())
    total.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    values = [parts.diffusion_sum, parts.ar_sum, *[s for s, _ in parts.extra.values()]]
    return torch.stack([v.detach() for v in values]), grads


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("pattern", ["two_stream", "bd3"])
@pytest.mark.parametrize("adapter,soft", [(False, False), (True, True), (False, True)])
def test_compacted_forward_gives_the_whole_rows_loss_and_gradients(implementation, pattern, adapter, soft):
    from nemodiff_train.assets import embedded_model_dir
    from nemodiff_train.models.hf import load_dlm

    torch.manual_seed(0)
    dlm = load_dlm(embedded_model_dir(), dtype=torch.float32, attn_implementation=implementation)
    dlm.settings.attention_pattern = pattern
    if adapter:
        dlm.add_adapter(rank=4)
        for p in dlm.adapter.parameters():  # LoRA's B starts at zero: move it so the adapter matters
            torch.nn.init.normal_(p, std=0.02)
    weights = DistillWeights(drafter_kl=1.0, certainty=0.5) if soft else None
    terms = [SoftTargetTerm(n, w) for n, w in weights.terms().items()] if soft else []
    whole = TwoStreamLoss(dlm, B, 64, terms, weights)
    compact = TwoStreamLoss(dlm, B, 64, terms, weights, skip_unmasked=True)
    for seed in (1, 2):
        mb = _sft_rows(dlm, seed)
        needed = compact.needed_positions(mb)
        assert whole.needed_positions(mb) is None and needed is not None
        layout = SequenceLayout(L, B, mb.doc_ids)
        kept = required_positions(dense_mask(pattern, layout), needed).sum(dim=1)
        assert int(kept.max()) * 16 <= 2 * L * 15, kept  # short enough that the compacted forward runs
        ref_parts, ref_grads = _parts_and_grads(whole, mb)
        parts, grads = _parts_and_grads(compact, mb)
        torch.testing.assert_close(parts, ref_parts, rtol=1e-5, atol=1e-5)
        assert grads.keys() == ref_grads.keys() and grads
        for name in grads:
            # summation order differs (attention over fewer keys, other matmul shapes): float noise
            # relative to the tensor's own scale, where a missing block would move it by O(1)
            scale = float(ref_grads[name].abs().max())
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=2e-6 * scale, msg=name)


def test_compaction_is_not_used_where_it_is_not_known_to_be_exact():
    from nemodiff_train.assets import embedded_model_dir
    from nemodiff_train.models.hf import load_dlm

    dlm = load_dlm(embedded_model_dir(), dtype=torch.float32, attn_implementation="sdpa")
    mb = _sft_rows(dlm, 1)

    class _Shard:  # a context-parallel slice: only its positions
        positions = torch.arange(2 * L)

    class ReadsEveryNoisyPosition:  # a caller's term: it may read unmasked noisy positions
        name, weight = "all", 1.0

    assert TwoStreamLoss(dlm, B, 64, [ReadsEveryNoisyPosition()], skip_unmasked=True).needed_positions(mb) is None
    with pytest.raises(ValueError, match="cannot be combined"):
        dlm.two_stream_hidden(mb.noise.noisy_ids, mb.x0, mb.doc_ids, B, shard=_Shard(),
                              needed=torch.ones(2, 2 * L, dtype=torch.bool))


def test_rows_that_keep_nearly_every_position_run_whole():
    """Packed pretraining rows keep almost every position: the whole rows run, bit for bit the same."""
    from nemodiff_train.assets import embedded_model_dir
    from nemodiff_train.models.hf import load_dlm

    dlm = load_dlm(embedded_model_dir(), dtype=torch.float32, attn_implementation="sdpa")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(10, 200, (2, L), generator=g)
    noisy = x0.masked_fill(torch.rand(2, L, generator=g) < 0.5, dlm.settings.mask_token_id)
    needed = torch.cat([noisy == dlm.settings.mask_token_id, torch.ones_like(x0, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        whole = dlm.two_stream_hidden(noisy, x0, block_size=B)
        kept = dlm.two_stream_hidden(noisy, x0, block_size=B, needed=needed)
    assert torch.equal(kept, whole)
