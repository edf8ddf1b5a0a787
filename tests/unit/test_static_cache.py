"""The static-shape cache (models/static_cache.py) decodes exactly like the dynamic one (models/cached.py).

Same weights behind both adapters; every decoder, block sizes 2-16, lengths that are not multiples of
B, EOS ids taken from the reference output so rows stop mid-block, batches of ragged prompts in every mode; windowed and eager-attention architectures; the final KV caches compared too.
"""

from functools import lru_cache

import pytest
import torch

from nemodiff_train.decoding import MODES, DecodeConfig, generate
from nemodiff_train.models.cached import HFCachedLM
from nemodiff_train.models.static_cache import StaticCachedLM
from tests.helpers.arch_matrix import arch_model
from tests.helpers.decoding import MASK_ID, one_thread, random_prompts  # noqa: F401 (autouse fixture)
from tests.helpers.tiny_models import tiny_model

pytestmark = pytest.mark.unit


@lru_cache(maxsize=None)
def pair(family: str, init: float = 1.0):
    """(dynamic, static) adapters over ONE tiny model; untied head, init 1.0: outputs change token often."""
    model = tiny_model(family, tie=False, initializer_range=init)
    return HFCachedLM(model, mask_token_id=MASK_ID), StaticCachedLM(model, mask_token_id=MASK_ID, capacity=400)


def assert_same(dyn, sta, prompts, mode, cfg):
    ref = generate(dyn, prompts, mode, cfg, return_cache=True)
    got = generate(sta, prompts, mode, cfg, return_cache=True)
    for i, (r, g) in enumerate(zip(ref, got)):
        where = f"{mode} row {i} (prompt {prompts[i]}, {cfg})"
        assert g.tokens == r.tokens, where
        assert g.stats.forwards == r.stats.forwards, where
        assert g.stats.finished_by == r.stats.finished_by, where
        assert len(g.cache) == len(r.cache), where
        for (gk, gv), (rk, rv) in zip(g.cache, r.cache):
            assert gk.shape == rk.shape, where
            torch.testing.assert_close(gk, rk, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(gv, rv, rtol=1e-4, atol=1e-5)
    return ref


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("block", [2, 4, 8, 16])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_static_equals_dynamic(family, block, mode):
    dyn, sta = pair(family)
    prompts = random_prompts(200 + block, 3, max_len=10)
    for i, max_new in enumerate((block + 3, 2 * block + 1)):
        cfg = DecodeConfig(max_new_tokens=max_new, block_size=block)
        group = prompts  # every mode decodes batches (ragged prompts)
        ref = assert_same(dyn, sta, group, mode, cfg)
        # an EOS that occurs mid-output (not at a block end) stops the row early, in both paths
        tokens = ref[0].tokens
        eos = next((t for j, t in enumerate(tokens[1:], 1) if j % block != block - 1), tokens[-1])
        assert_same(dyn, sta, group, mode, DecodeConfig(max_new_tokens=max_new, block_size=block, eos_token_ids=(eos,)))


@pytest.mark.parametrize("mode", sorted(MODES))
def test_static_equals_dynamic_with_drafts_accepted(mode):
    """A repetitive model: self-speculation accepts drafts, so the crop-after-accept path is compared too."""
    dyn, sta = pair("qwen3", init=0.1)
    accepted = 0
    for prompt in random_prompts(9, 3):
        cfg = DecodeConfig(max_new_tokens=17, block_size=4)
        assert_same(dyn, sta, [prompt], mode, cfg)
        accepted += sum(r.stats.accepted for r in generate(sta, [prompt], mode, cfg))
    if mode.endswith("_spec"):
        assert accepted > 0, "no draft accepted: the acceptance path was not exercised"


@pytest.mark.parametrize("rule", ["prefix", "prefix_ar"])
def test_static_equals_dynamic_for_the_left_to_right_commit_rules(rule):
    """Block diffusion's other commit rules; under prefix_ar the rows of a ragged batch end their blocks at
    different places, so the per-row cache re-pack runs on the static cache too."""
    dyn, sta = pair("qwen3", init=0.3)
    prompts = random_prompts(77, 3, max_len=10)
    for threshold in (0.1, 0.5):
        cfg = DecodeConfig(max_new_tokens=19, block_size=4, threshold=threshold, commit_rule=rule)
        ref = assert_same(dyn, sta, prompts, "diffusion", cfg)
        if rule == "prefix_ar" and threshold == 0.1:
            assert any(0 in r.stats.committed_per_forward[:-1] for r in ref), "no block ended early"


@pytest.mark.parametrize("name,impl", [("qwen2_window", "sdpa"), ("mistral_window", "sdpa"), ("llama_untied", "eager")])
def test_static_equals_dynamic_other_architectures(name, impl):
    """Sliding windows (per-layer mask dicts, window measured in RoPE positions) and the eager additive mask."""
    model = arch_model(name, attn_implementation=impl, initializer_range=1.0)
    dyn, sta = HFCachedLM(model, mask_token_id=MASK_ID), StaticCachedLM(model, mask_token_id=MASK_ID, capacity=256)
    prompts = random_prompts(31, 2, min_len=5, max_len=12)
    for mode in sorted(MODES):
        group = prompts if mode in ("ar", "diffusion") else prompts[:1]
        assert_same(dyn, sta, group, mode, DecodeConfig(max_new_tokens=21, block_size=4))


def test_embedded_model_static_equals_dynamic():
    """The packaged demo model (bf16 weights, run in fp32 here as nemodiff-eval does on CPU)."""
    from nemodiff_train.assets import embedded_model_dir
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    dyn, sta = HFCachedLM(model, mask_token_id=MASK_ID), StaticCachedLM(model, mask_token_id=MASK_ID, capacity=200)
    prompts = random_prompts(5, 2, min_len=6, max_len=20)
    for mode in sorted(MODES):
        group = prompts if mode in ("ar", "diffusion") else prompts[:1]
        assert_same(dyn, sta, group, mode, DecodeConfig(max_new_tokens=24, block_size=8))


def test_overflow_refused_and_replaced_cache_refused():
    _, sta = pair("qwen3")
    small = StaticCachedLM(sta.hf, mask_token_id=MASK_ID, capacity=10)
    with pytest.raises(ValueError, match="static cache overflow"):
        generate(small, [[5, 6, 7]], "ar", DecodeConfig(max_new_tokens=20))
    first = small.new_cache(1)
    small.new_cache(1)  # reuses the same buffers: the first handle must refuse
    with pytest.raises(RuntimeError, match="replaced"):
        small.forward(first, torch.tensor([[5]]), torch.tensor([[0]]), torch.ones(1, 1, 1, dtype=torch.bool), True)


def test_keep_cache_refuses_columns_beyond_the_cache():
    _, sta = pair("qwen3")
    cache = sta.new_cache(1)
    sta.forward(cache, torch.tensor([[5, 6]]), torch.tensor([[0, 1]]), torch.ones(1, 2, 2, dtype=torch.bool).tril(), True)
    with pytest.raises(ValueError, match="beyond"):
        sta.keep_cache(cache, torch.tensor([0, 2]))
    sta.keep_cache(cache, torch.tensor([1]))
    assert sta.cache_length(cache) == 1


def test_cuda_graphs_refused_off_cuda():
    model = tiny_model("qwen3")
    with pytest.raises(ValueError, match="needs a model on CUDA"):
        StaticCachedLM(model, mask_token_id=MASK_ID, cuda_graphs=True)


@pytest.mark.slow
def test_compiled_static_equals_dynamic():
    """compile=True: the post-prefill forwards run through torch.compile (inductor builds C++ kernels on a
    CPU; about a minute per compilation here) and give the dynamic path's tokens. AR compiles the q = 1
    step, linear self-speculation the q > 1 steps of every verify length (one dynamic-shape compilation)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = tiny_model("qwen3", tie=False, initializer_range=1.0)
    dyn = HFCachedLM(model, mask_token_id=MASK_ID)
    compiled = StaticCachedLM(model, mask_token_id=MASK_ID, capacity=256, compile=True)
    prompts = random_prompts(4, 2, min_len=3, max_len=20)
    cfg = DecodeConfig(max_new_tokens=19, block_size=4)
    for mode in ("ar", "linear_spec"):
        got = generate(compiled, prompts[:1], mode, cfg)
        ref = generate(dyn, prompts[:1], mode, cfg)
        assert [g.tokens for g in got] == [r.tokens for r in ref], mode
        assert [g.stats.forwards for g in got] == [r.stats.forwards for r in ref], mode
    assert counters["stats"]["unique_graphs"] >= 2, dict(counters["stats"])  # it compiled, not fell back
