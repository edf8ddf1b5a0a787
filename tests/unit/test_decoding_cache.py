"""KV-cache discipline (docs/decoding.md, "KV cache"): after any decoder, the cache equals one causal pass
over prompt + emitted tokens, except for the emitted tokens that are not cached yet (the seed), and,
after an early stop, states past the output (EOS block remainder, accepted-then-cut drafts)."""

import pytest
import torch

from nemodiff_train.decoding import MODES, DecodeConfig, generate
from tests.helpers.decoding import one_thread, random_prompts, reference_cache, tiny_lm  # noqa: F401

pytestmark = pytest.mark.unit

# cached positions beyond prompt + tokens - 1, as (min, max) for a run that ended by length
EXTRA_BY_LENGTH = {"ar": (0, 0), "diffusion": (1, 1), "linear_spec": (0, 0), "quadratic_spec": (1, 1)}


def assert_cache_is_causal(lm, prompt, result, block):
    seq = prompt + result.tokens
    got = result.cache
    C = got[0][0].shape[2]
    assert C >= len(seq) - 1, "an emitted token other than the last is missing from the cache"
    assert C <= len(seq) - 1 + block, "the cache holds more than one block past the output"
    ref = reference_cache(lm, seq)
    n = min(C, len(seq))
    for (k, v), (rk, rv) in zip(got, ref):
        torch.testing.assert_close(k[:, :, :n], rk[:, :, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v[:, :, :n], rv[:, :, :n], atol=1e-5, rtol=1e-5)
    return C - (len(seq) - 1)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_final_cache_equals_one_causal_pass(mode):
    lm = tiny_lm("qwen3", tie=False, initializer_range=0.1)
    for i, prompt in enumerate(random_prompts(21, 3)):
        cfg = DecodeConfig(max_new_tokens=[9, 13, 8][i], block_size=4)
        res = generate(lm, [prompt], mode, cfg, return_cache=True)[0]
        assert res.stats.finished_by == "length"
        extra = assert_cache_is_causal(lm, prompt, res, 4)
        lo, hi = EXTRA_BY_LENGTH[mode]
        # quadratic caches every emitted token (the next d_0 is not emitted yet), and no more
        assert lo <= extra <= hi, extra
        # with an EOS taken from the output the run stops early; the cached prefix is still exact
        eos = res.tokens[len(res.tokens) // 2]
        cut = generate(lm, [prompt], mode, DecodeConfig(max_new_tokens=cfg.max_new_tokens, block_size=4,
                                                        eos_token_ids=(eos,)), return_cache=True)[0]
        assert cut.stats.finished_by == "eos" and cut.tokens[-1] == eos
        assert_cache_is_causal(lm, prompt, cut, 4)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_batched_row_caches_are_causal(mode):
    lm = tiny_lm("llama", tie=False, initializer_range=0.1)
    prompts = random_prompts(5, 3, min_len=1, max_len=9)
    first = generate(lm, prompts[:1], mode, DecodeConfig(max_new_tokens=10, block_size=4))[0]
    cfg = DecodeConfig(max_new_tokens=10, block_size=4, eos_token_ids=(first.tokens[5],))
    results = generate(lm, prompts, mode, cfg, return_cache=True)
    assert results[0].stats.finished_by == "eos"
    for res, prompt in zip(results, prompts):
        # rows that stop early keep being fed in lockstep: compare only the row's own prefix
        seq = prompt + res.tokens
        ref = reference_cache(lm, seq)
        n = len(seq) - 1
        assert res.cache[0][0].shape[2] >= n
        for (k, v), (rk, rv) in zip(res.cache, ref):
            torch.testing.assert_close(k[:, :, :n], rk[:, :, :n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v[:, :, :n], rv[:, :, :n], atol=1e-5, rtol=1e-5)
