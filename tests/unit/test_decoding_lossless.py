"""Self-speculation at temperature 0 equals AR greedy decoding token for token (docs/decoding.md, "Lossless at temperature 0").

fp32 tiny random models of two families, many prompts, block sizes 2-16, lengths that are not
multiples of B, and EOS ids taken from the AR output so stopping happens mid-block. A second,
repetitive model makes drafts match, so acceptance (not only the rejection path) is exercised.
"""

from functools import lru_cache

import pytest
import torch

from nemodiff_train.decoding import DecodeConfig, ar_generate, linear_spec_generate, quadratic_spec_generate
from tests.helpers.decoding import ScriptedLM, one_thread, random_prompts, tiny_lm  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.unit

SPEC = {"linear_spec": linear_spec_generate, "quadratic_spec": quadratic_spec_generate}


@lru_cache(maxsize=None)
def varied_lm(family):
    """Untied head, large init: outputs change token often."""
    return tiny_lm(family, tie=False, initializer_range=1.0)


@lru_cache(maxsize=None)
def repetitive_lm(family):
    """Untied head, small init: long runs of one token, which the diffusion draft often guesses."""
    return tiny_lm(family, tie=False, initializer_range=0.1)


def late_eos(tokens: list[int], block: int) -> int:
    """A token of ``tokens`` whose first occurrence is as late as possible and not at a block end."""
    first = {}
    for i, t in enumerate(tokens):
        first.setdefault(t, i)
    ranked = sorted(first.items(), key=lambda kv: (kv[1] % block != block - 1, kv[1]), reverse=True)
    return ranked[0][0]


def assert_spec_equals_ar(lm, prompt, cfg):
    ref = ar_generate(lm, [prompt], cfg)[0]
    for name, decoder in SPEC.items():
        got = decoder(lm, [prompt], cfg)[0]
        assert got.tokens == ref.tokens, f"{name} != ar (prompt {prompt}, {cfg})"
        assert got.stats.finished_by == ref.stats.finished_by
        assert got.stats.accepted <= got.stats.drafted
    return ref


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("block", [2, 4, 8, 16])
def test_greedy_spec_equals_ar(family, block):
    lm = varied_lm(family)
    for i, prompt in enumerate(random_prompts(100 + block, 3)):
        max_new = [block + 3, 2 * block + 1, 7][i]
        ref = assert_spec_equals_ar(lm, prompt, DecodeConfig(max_new_tokens=max_new, block_size=block))
        assert len(ref.tokens) == max_new
        eos = late_eos(ref.tokens, block)
        cut = ar_generate(lm, [prompt], DecodeConfig(max_new_tokens=max_new, eos_token_ids=(eos,)))[0]
        assert cut.tokens == ref.tokens[:ref.tokens.index(eos) + 1]
        assert_spec_equals_ar(lm, prompt, DecodeConfig(max_new_tokens=max_new, block_size=block, eos_token_ids=(eos,)))


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_drafts_get_accepted_on_a_repetitive_model(family):
    lm = repetitive_lm(family)
    accepted = {name: 0 for name in SPEC}
    multi = {name: 0 for name in SPEC}  # cycles that accepted >= 2 drafts
    for block in (4, 8):
        for prompt in random_prompts(7 + block, 4):
            cfg = DecodeConfig(max_new_tokens=17, block_size=block)
            ref = ar_generate(lm, [prompt], cfg)[0]
            for name, decoder in SPEC.items():
                got = decoder(lm, [prompt], cfg)[0]
                assert got.tokens == ref.tokens, f"{name} != ar (prompt {prompt}, B={block})"
                accepted[name] += got.stats.accepted
                # linear: a verify emitting k+1 tokens accepted k; quadratic: a cycle emitting acc accepted acc-1
                multi[name] += sum(c >= 3 for c in got.stats.committed_per_forward)
    assert all(v > 0 for v in accepted.values()), accepted
    assert all(v > 0 for v in multi.values()), multi


def test_spec_forward_accounting():
    lm = repetitive_lm("qwen3")
    cfg = DecodeConfig(max_new_tokens=30, block_size=4)
    prompt = random_prompts(3, 1)[0]
    lin = linear_spec_generate(lm, [prompt], cfg)[0].stats
    # each cycle = draft (emits nothing) + verify (emits k + 1); a cycle with a single token left
    # has nothing to draft and is a lone verify. The prefill's seed is the one extra token.
    c = lin.committed_per_forward
    drafts = [i for i, n in enumerate(c) if n == 0]
    assert all(c[i + 1] > 0 for i in drafts) and len(c) - len(drafts) in (len(drafts), len(drafts) + 1)
    assert sum(c) + 1 == lin.generated_tokens == 30 and lin.accepted == sum(n - 1 for n in c if n > 0)
    quad = quadratic_spec_generate(lm, [prompt], cfg)[0].stats
    # one initial draft pass (emits nothing), then one forward per cycle emitting acc tokens
    assert quad.committed_per_forward[0] == 0 and sum(quad.committed_per_forward) == 30
    # every cycle but the last emits acc = accepted + 1 tokens; the last may be cut by max_new_tokens
    full = sum(c - 1 for c in quad.committed_per_forward[1:-1])
    assert full + quad.committed_per_forward[-1] - 1 <= quad.accepted <= full + cfg.block_size - 1
    assert quad.tpf == 30 / quad.forwards


def test_spec_sampling_is_reproducible_and_maskless():
    lm = varied_lm("qwen3")
    prompt = random_prompts(5, 1)[0]
    cfg = DecodeConfig(max_new_tokens=17, block_size=4, temperature=1.0, top_p=0.9, seed=3)
    for decoder in SPEC.values():
        a, b = decoder(lm, [prompt], cfg)[0], decoder(lm, [prompt], cfg)[0]
        assert a.tokens == b.tokens and len(a.tokens) == 17 and lm.mask_token_id not in a.tokens


def test_spec_sampling_is_distributed_as_ar_sampling():
    # bigram scripted model: causal logits = Tc[token], drafts = Tb[token] (a different distribution)
    V, mask = 5, 1
    gen = torch.Generator().manual_seed(0)
    Tc, Tb = torch.randn(V, V, generator=gen) * 1.5, torch.randn(V, V, generator=gen) * 1.5
    lm = ScriptedLM(lambda call: (Tc if call.write_cache else Tb)[call.input_ids], V, mask)
    p = torch.softmax(Tc.masked_fill(torch.arange(V) == mask, float("-inf")), dim=-1)  # [V, V] next | current
    exact = [p[0], p[0] @ p, p[0] @ p @ p]  # marginals of tokens 1..3 after the prompt [0]
    n = 500
    for decoder in SPEC.values():
        counts = torch.zeros(3, V)
        for seed in range(n):
            cfg = DecodeConfig(max_new_tokens=3, block_size=3, temperature=1.0, seed=seed)
            for i, t in enumerate(decoder(lm, [[0]], cfg)[0].tokens):
                counts[i, t] += 1
        tv = 0.5 * (counts / n - torch.stack(exact)).abs().sum(dim=-1)  # [3] total variation per position
        assert (tv < 0.08).all(), (decoder.__name__, tv)
