"""The forward step's batch and loss function (Megatron's (loss, num_tokens, report) convention)."""

from __future__ import annotations

import pytest
import torch


def _sample(b=3, L=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(10, 50, (b, L), generator=g)
    doc = torch.zeros(b, L, dtype=torch.long)
    doc[0, 9:] = 1
    lm = torch.ones(b, L, dtype=torch.bool)
    lm[2, :6] = False
    return {"tokens": x0, "doc_ids": doc, "loss_mask": lm, "sample_index": torch.tensor([7, 8, 9]),
            "noise_seed": torch.zeros(b, dtype=torch.long)}


def test_noise_depends_on_the_sample_not_on_the_batch():
    """A rank holding only part of the batch (or another micro-batch split) derives the same x_t."""
    from nemodiff_train.engines.megatron.step import make_batch

    kw = dict(mask_token_id=3, schedule="uniform", eps=1e-3, block_size=8, half_life_ratio=0.25, device="cpu")
    s = _sample()
    whole = make_batch(s, **kw)
    part = make_batch({k: v[1:] for k, v in s.items()}, **kw)
    assert torch.equal(whole.input_ids[1:], part.input_ids) and torch.equal(whole.masked[1:], part.masked)
    L = s["tokens"].shape[1]
    assert torch.equal(whole.input_ids[:, L:], s["tokens"])  # [x_t ; x_0]
    assert torch.equal(whole.labels[:, :L], s["tokens"])  # noisy half: same-position targets
    assert torch.equal(whole.labels[:, L:-1], s["tokens"][:, 1:])  # clean half: next token
    assert not whole.masked[2, :6].any()  # prompt tokens are never noised
    assert not whole.supervised[0, 8]  # no AR target across the packing boundary 8 -> 9
    assert torch.equal(whole.position_ids[0, 9:L], torch.arange(L - 9))  # positions restart per document


def test_loss_function_returns_sums_counts_and_report():
    from nemodiff_train.core.losses import LossWeights
    from nemodiff_train.engines.megatron.step import TwoStreamForwardStep, loss_from_token_ce, make_batch

    step = TwoStreamForwardStep(mask_token_id=3, block_size=8)
    batch = make_batch(_sample(), mask_token_id=3, schedule="uniform", eps=1e-3, block_size=8, half_life_ratio=0.25,
                       device="cpu")
    ce = torch.rand(3, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    num, count, report = step.loss_func(batch, ce)
    parts = loss_from_token_ce(ce, batch)
    w = LossWeights(0.3, 1.0)
    assert torch.allclose(num, parts.numerator(w)) and count.dtype == torch.int
    assert int(count) == int(parts.denominator(w))
    assert torch.allclose(report["ar_loss"], torch.stack([parts.ar_sum, parts.ar_count]).detach())
    num.backward()
    assert ce.grad[:, 16:].sum() > 0  # gradients reach the clean half

    frac = TwoStreamForwardStep(mask_token_id=3, block_size=8, beta=0.5)  # Megatron counts tokens in an int
    num2, count2, rep2 = frac.loss_func(batch, ce.detach())
    exact = float(parts.numerator(LossWeights(0.3, 0.5)) / parts.denominator(LossWeights(0.3, 0.5)))
    assert abs(float(num2) / int(count2) - exact) < 1e-3 * exact
    assert abs(float(rep2["lm loss"][0] / rep2["lm loss"][1]) - exact) < 1e-6

    bad = ce.detach().clone()
    bad[0, 0] = float("nan")
    batch.masked[0, 0] = True
    with pytest.raises(FloatingPointError):
        step.loss_func(batch, bad)


@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_shares_sum_to_the_whole_row(cp):
    """Each CP rank keeps its positions of the noised row (Megatron's order); its loss masks cover only
    them, so the ranks' sums and counts add up to the one-rank step's, and the noise is the global row's."""
    from nemodiff_train.engines.megatron.context_parallel import cp_positions
    from nemodiff_train.engines.megatron.step import CPShare, loss_from_token_ce, make_batch

    kw = dict(mask_token_id=3, schedule="uniform", eps=1e-3, block_size=4, half_life_ratio=0.25, device="cpu")
    s = _sample()
    whole = make_batch(s, **kw)
    ce = torch.rand(3, 32, generator=torch.Generator().manual_seed(2))
    ref = loss_from_token_ce(ce, whole)
    fields = ("diffusion_sum", "diffusion_count", "ar_sum", "ar_count")
    total = dict.fromkeys(fields, 0.0)
    for r in range(cp):
        part = make_batch(s, cp=CPShare(cp, r), **kw)
        pos = cp_positions(32, cp, r)
        assert torch.equal(part.input_ids, whole.input_ids[:, pos]) and torch.equal(part.labels, whole.labels[:, pos])
        assert torch.equal(part.doc_ids, whole.doc_ids)  # the attention gets the whole row's documents
        got = loss_from_token_ce(ce[:, pos], part)
        total = {f: total[f] + float(getattr(got, f)) for f in fields}
    for f in fields:
        assert abs(total[f] - float(getattr(ref, f))) <= 1e-5 * abs(float(getattr(ref, f))), f
    assert total["diffusion_count"] > 0 and total["ar_count"] > 0
    with pytest.raises(ValueError, match="multiple of engine.cp=3"):
        make_batch(s, cp=CPShare(3, 0), **kw)


def test_keep_block_start_reaches_the_megatron_step():
    """``diffusion.keep_block_start`` is passed to the noising by the step (block starts per document)."""
    from nemodiff_train.engines.megatron.step import TwoStreamForwardStep, make_batch

    step = TwoStreamForwardStep(mask_token_id=3, schedule="position_dependent", block_size=4, keep_block_start=True)
    assert step.noise_kw["keep_block_start"] is True
    samples = [_sample(seed=s) for s in range(40)]
    kept = [make_batch(s, device="cpu", **step.noise_kw).masked for s in samples]
    plain = [make_batch(s, device="cpu", **{**step.noise_kw, "keep_block_start": False}).masked for s in samples]
    starts = torch.zeros(3, 16, dtype=torch.bool)
    starts[:, [0, 4, 8, 12]] = True
    starts[0, [9, 13]], starts[0, 12] = True, False  # row 0 holds a second document from position 9
    assert not any(m[starts].any() for m in kept)
    assert any(m[starts].any() for m in plain)
    with pytest.raises(TypeError, match="mask_token_id"):
        TwoStreamForwardStep(block_size=4)


def test_the_run_config_noise_settings_reach_the_megatron_step():
    """The Megatron job builds its step from ``noise_settings(cfg.diffusion)``: whole-block masking
    (``full_block_fraction = 1``) masks every eligible token of the step's batch at loss weight 1."""
    from nemodiff_train.config.schema import DiffusionConfig
    from nemodiff_train.engines.megatron.step import TwoStreamForwardStep, make_batch
    from nemodiff_train.models.step import noise_settings

    d = DiffusionConfig(schedule="position_dependent", block_size=4, keep_block_start=True, full_block_fraction=1.0)
    step = TwoStreamForwardStep(mask_token_id=3, **noise_settings(d))
    s = _sample()
    batch = make_batch(s, device="cpu", **step.noise_kw)
    starts = torch.zeros(3, 16, dtype=torch.bool)
    starts[:, [0, 4, 8, 12]] = True
    starts[0, [9, 13]], starts[0, 12] = True, False  # row 0 holds a second document from position 9
    eligible = s["loss_mask"] & ~starts
    assert torch.equal(batch.masked, eligible)
    assert torch.all(batch.mask_prob[eligible] == 1.0)
