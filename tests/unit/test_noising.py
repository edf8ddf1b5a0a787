"""Noising follows its schedule and is a function of (seed, sample index) only."""

import math

import pytest
import torch

from nemodiff_train.core.masks import SequenceLayout
from nemodiff_train.core.noising import NoiseConfigError, apply_noise, diffusion_blocks

pytestmark = pytest.mark.unit
MASK = 99


def _noise(x0, indices, schedule="uniform", loss_mask=None, **kw):
    loss_mask = torch.ones_like(x0, dtype=torch.bool) if loss_mask is None else loss_mask
    return apply_noise(x0, loss_mask, indices, seed=1234, mask_token_id=MASK, schedule=schedule, **kw)


@pytest.mark.parametrize("schedule", ["uniform", "position_dependent"])
def test_noise_independent_of_batch_composition(schedule):
    x0 = torch.randint(0, 50, (4, 64))
    alone = _noise(x0[2:3], [17], schedule, block_size=16)
    in_batch = _noise(torch.stack([x0[0], x0[2], x0[1]]), [5, 17, 40], schedule, block_size=16)
    assert torch.equal(alone.masked[0], in_batch.masked[1])
    assert torch.equal(alone.mask_prob[0], in_batch.mask_prob[1])
    other_seed = apply_noise(x0[2:3], torch.ones(1, 64, dtype=torch.bool), [17], seed=1, mask_token_id=MASK,
                             schedule=schedule, block_size=16)
    assert not torch.equal(alone.masked, other_seed.masked)


def test_uniform_rate_follows_per_sequence_p():
    n, length, eps = 2000, 256, 1e-3
    out = _noise(torch.zeros(n, length, dtype=torch.long), list(range(n)), eps=eps)
    p = out.mask_prob[:, 0]
    assert torch.all((out.mask_prob == p[:, None]))  # one p per sequence
    assert p.min() >= eps and p.max() <= 1.0
    assert abs(p.mean().item() - (1 + eps) / 2) < 0.02  # p = (1-eps) t + eps, t ~ U(0,1)
    rate = out.masked.float().mean(dim=1)
    assert (rate - p).abs().mean() < 0.03  # each row's masking rate tracks its p
    assert torch.equal(out.noisy_ids[out.masked], torch.full_like(out.noisy_ids[out.masked], MASK))


def test_loss_mask_zero_is_never_masked():
    x0 = torch.randint(0, 50, (64, 32))
    loss_mask = torch.zeros_like(x0, dtype=torch.bool)
    loss_mask[:, 16:] = True
    for schedule in ("uniform", "position_dependent"):
        out = _noise(x0, list(range(64)), schedule, loss_mask=loss_mask, block_size=8)
        assert not out.masked[:, :16].any()
        assert out.masked[:, 16:].any()
        assert torch.equal(out.noisy_ids[:, :16], x0[:, :16])


def test_position_dependent_shape_and_counts():
    """Exact count round(m·n) per block; at low m later positions are masked more (≈ 2^((1-m)/h))."""
    block, n_rows, h = 16, 3000, 0.25
    out = _noise(torch.zeros(n_rows, block, dtype=torch.long), list(range(n_rows)), "position_dependent",
                 block_size=block, half_life_ratio=h)
    m = out.mask_prob[:, 0]
    assert torch.equal(out.masked.sum(1), torch.round(m * block).long())
    low = out.masked[(m > 0.1) & (m < 0.4)].float().mean(0)
    assert low[-4:].mean() > 2.5 * low[:4].mean()  # strongly tail-heavy at low noise
    high = out.masked[m > 0.9].float().mean(0)
    assert high[-4:].mean() < 1.2 * high[:4].mean()  # close to uniform when almost all is masked
    # expected end-to-start weight ratio at m: 2^((1-m)/h) (within sampling noise, around m = 0.25)
    assert math.isclose(2 ** (0.75 / h), 8.0)


def test_position_dependent_blocks_restart_at_document_starts():
    """Packed rows: the noise blocks are the attention pattern's per-document blocks."""
    docs = torch.tensor([[0] * 6 + [1] * 7 + [2] * 3])  # L = 16, B = 4
    assert diffusion_blocks(docs, 16, 4) == [[(0, 4), (4, 6), (6, 10), (10, 13), (13, 16)]]
    block_ids = SequenceLayout(16, 4, docs).block_ids()[0]
    n_rows = 400
    out = _noise(torch.zeros(n_rows, 16, dtype=torch.long), list(range(n_rows)), "position_dependent",
                 block_size=4, doc_ids=docs.expand(n_rows, 16))
    for start, stop in diffusion_blocks(docs, 16, 4)[0]:
        p = out.mask_prob[:, start:stop]
        assert torch.all(p == p[:, :1])  # one noise level per block ...
        assert torch.equal(out.masked[:, start:stop].sum(1), torch.round(p[:, 0] * (stop - start)).long())
        assert len(set(block_ids[start:stop].tolist())) == 1  # ... and the same block the mask uses
    # neighbouring blocks across a document start draw their own levels
    assert not torch.equal(out.mask_prob[:, 5], out.mask_prob[:, 6])
    # without doc ids the fixed grid 0, B, 2B, ... is used, as before
    plain = _noise(torch.zeros(n_rows, 16, dtype=torch.long), list(range(n_rows)), "position_dependent", block_size=4)
    assert torch.equal(plain.mask_prob[:, 4], plain.mask_prob[:, 7]) and diffusion_blocks(None, 16, 4) is None


def test_bad_settings_raise():
    x0 = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(NoiseConfigError, match="unknown noise schedule"):
        _noise(x0, [0], "cosine")
    with pytest.raises(NoiseConfigError, match="eps"):
        _noise(x0, [0], eps=0.0)


@pytest.mark.parametrize("schedule", ["uniform", "position_dependent"])
def test_keep_block_start_never_masks_a_block_start(schedule):
    """The first token of every block (the grid, or per document in packed rows) stays clean, every other
    token can be masked, and the counts follow the remaining eligible tokens."""
    block, n_rows = 8, 400
    x0 = torch.arange(n_rows * 40).view(n_rows, 40) % 50 + 10
    docs = torch.zeros(n_rows, 40, dtype=torch.long)
    docs[:, 13:] = 1  # a second document from position 13: its blocks start at 13, 21, 29, 37
    starts = torch.zeros(40, dtype=torch.bool)
    starts[[0, 8, 13, 21, 29, 37]] = True
    out = _noise(x0, list(range(n_rows)), schedule, block_size=block, doc_ids=docs, keep_block_start=True)
    assert not out.masked[:, starts].any()
    assert out.masked[:, ~starts].float().mean(0).min() > 0.2  # every other position is masked in some rows
    plain = _noise(x0, list(range(n_rows)), schedule, block_size=block, doc_ids=docs)
    assert plain.masked[:, starts].any()  # without the option the block starts are masked like any token
    if schedule == "position_dependent":  # round(m * eligible) per block: a block of 8 has 7 eligible tokens
        m = out.mask_prob[:, 0]
        assert torch.equal(out.masked[:, :8].sum(1), torch.round(m * 7).long())


def _fully_masked_blocks(out, blocks, eligible):
    """[rows, n_blocks] bool: blocks whose every eligible token is masked."""
    return torch.stack([(out.masked[:, a:b] | ~eligible[:, a:b]).all(1) for a, b in blocks], dim=1)


@pytest.mark.parametrize("schedule", ["uniform", "position_dependent"])
def test_full_block_fraction_masks_that_share_of_blocks_whole(schedule):
    """With q > 0 a share q of the blocks (plus those the schedule masks whole anyway) has every eligible
    token masked, at loss weight p = 1; the prompt, the clean block starts and the packed documents'
    own blocks are respected; the rest of each row keeps the schedule's own noise."""
    n_rows, q = 600, 0.4
    x0 = torch.arange(n_rows * 40).view(n_rows, 40) % 50 + 10
    docs = torch.zeros(n_rows, 40, dtype=torch.long)
    docs[:, 13:] = 1
    loss_mask = torch.ones_like(x0, dtype=torch.bool)
    loss_mask[:, :3] = False  # a prompt: never masked, even in a block masked whole
    kw = dict(block_size=8, doc_ids=docs, keep_block_start=True, loss_mask=loss_mask)
    plain = _noise(x0, list(range(n_rows)), schedule, **kw)
    whole = _noise(x0, list(range(n_rows)), schedule, full_block_fraction=q, **kw)
    blocks = diffusion_blocks(docs[:1], 40, 8)[0]
    eligible = loss_mask.clone()
    eligible[:, [a for a, _ in blocks]] = False
    assert not whole.masked[~eligible].any()  # prompt and block starts stay clean
    full_plain = _fully_masked_blocks(plain, blocks, eligible).float().mean()
    full = _fully_masked_blocks(whole, blocks, eligible).float().mean()
    # P(whole) = q + (1 - q) P(the schedule masks it whole): within 4 standard errors of 3000 blocks
    expected = q + (1 - q) * full_plain
    assert abs(full - expected) < 4 * math.sqrt(expected * (1 - expected) / (n_rows * len(blocks)))
    assert full > full_plain + 0.3
    chosen = torch.zeros_like(whole.masked)
    for a, b in blocks:  # a block whose noise changed is masked whole, with p = 1 on every position
        changed = (whole.masked[:, a:b] != plain.masked[:, a:b]).any(1) | (whole.mask_prob[:, a:b] != plain.mask_prob[:, a:b]).any(1)
        assert torch.all(whole.mask_prob[changed, a:b] == 1.0)
        assert torch.equal(whole.masked[changed, a:b], eligible[changed, a:b])
        chosen[changed, a:b] = True
    # every other position keeps the schedule's draw exactly (whole-block masking draws after it)
    assert torch.equal(whole.masked[~chosen], plain.masked[~chosen])
    assert torch.equal(whole.mask_prob[~chosen], plain.mask_prob[~chosen])


def test_full_block_fraction_zero_is_the_schedule_and_out_of_range_is_refused():
    x0 = torch.randint(0, 50, (16, 32))
    for schedule in ("uniform", "position_dependent"):
        a = _noise(x0, list(range(16)), schedule, block_size=8)
        b = _noise(x0, list(range(16)), schedule, block_size=8, full_block_fraction=0.0)
        assert torch.equal(a.masked, b.masked) and torch.equal(a.mask_prob, b.mask_prob)
    everything = _noise(x0, list(range(16)), "uniform", block_size=8, full_block_fraction=1.0)
    assert everything.masked.all() and torch.all(everything.mask_prob == 1.0)
    for bad in (-0.1, 1.5):
        with pytest.raises(NoiseConfigError, match="full_block_fraction"):
            _noise(x0, [0] * 16, full_block_fraction=bad)


def test_noise_settings_carry_every_setting_of_apply_noise_from_the_config():
    """The engines noise through ``noise_settings(cfg.diffusion)``: it names every setting ``apply_noise``
    takes (a new one missing here would be silently left at its default in training), reads each from
    the config, and collate applies them (full_block_fraction = 1 masks every eligible token)."""
    import inspect

    from nemodiff_train.config.schema import DiffusionConfig
    from nemodiff_train.models.step import collate, noise_settings

    per_call = {"x0", "loss_mask", "sample_indices", "seed", "mask_token_id", "doc_ids"}
    settings = set(inspect.signature(apply_noise).parameters) - per_call
    d = DiffusionConfig(schedule="position_dependent", eps=0.01, block_size=4, half_life_ratio=0.5,
                        keep_block_start=True, full_block_fraction=1.0)
    got = noise_settings(d)
    assert set(got) == settings
    assert all(got[k] == getattr(d, k) for k in settings)
    rows = [{"input_ids": torch.arange(12) + 10, "doc_ids": torch.zeros(12, dtype=torch.long),
             "loss_mask": torch.tensor([0, 0, 0] + [1] * 9)} for _ in range(3)]
    mb = collate(rows, [0, 1, 2], seed=3, mask_token_id=MASK, **got)
    eligible = torch.tensor([0, 0, 0] + [1] * 9, dtype=torch.bool) & (torch.arange(12) % 4 != 0)
    assert torch.equal(mb.noise.masked, eligible.expand(3, 12))
    assert torch.all(mb.noise.mask_prob[:, eligible] == 1.0)
