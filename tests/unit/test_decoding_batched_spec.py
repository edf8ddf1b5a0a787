"""Every mode decodes a batch of prompts of different lengths exactly as it decodes each prompt alone
(docs/decoding.md, "Batched self-speculation"): tokens and every per-row count, block sizes 4/8/16,
batches of 2, 3 and 8, rows stopping by EOS at different steps or by the length cap, fp32, greedy; and
sampled (row r with seed ``cfg.seed + r``). Both KV-cache adapters (dynamic and static)."""

import dataclasses
from functools import lru_cache

import pytest

from nemodiff_train.decoding import MODES, DecodeConfig, generate
from nemodiff_train.models.static_cache import StaticCachedLM
from tests.helpers.decoding import MASK_ID, one_thread, random_prompts, tiny_lm  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.unit


@lru_cache(maxsize=None)
def repetitive_lm():
    """Small init: long runs the drafts often guess, so rows accept different numbers of drafts per cycle."""
    return tiny_lm("qwen3", tie=False, initializer_range=0.1)


def stopping_tokens(outputs: list[list[int]], block: int) -> tuple[int, ...]:
    """Two EOS ids that end some rows early, at different steps (first occurrences far apart)."""
    firsts = sorted({(i, t) for out in outputs for i, t in enumerate(out) if t not in out[:i]})
    early = next(t for i, t in firsts if i >= 2)
    late = next((t for i, t in firsts if i >= block + 2 and t != early), early)
    return (early, late)


def assert_rows_equal(batch, alone, where):
    for r, (got, ref) in enumerate(zip(batch, alone)):
        assert got.tokens == ref.tokens, f"{where}: row {r} tokens"
        assert got.stats == ref.stats, f"{where}: row {r} counts"


@pytest.mark.parametrize("block", [4, 8, 16])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_batch_rows_equal_alone(mode, block):
    lm = repetitive_lm()
    prompts = random_prompts(40 + block, 8, min_len=1, max_len=14)
    prompts[3] = prompts[3][:1]  # a one-token prompt beside 14-token ones
    probe = generate(lm, prompts, mode, DecodeConfig(max_new_tokens=block + 5, block_size=block))
    cfg = DecodeConfig(max_new_tokens=block + 5, block_size=block,
                       eos_token_ids=stopping_tokens([p.tokens for p in probe], block))
    alone = [generate(lm, [p], mode, cfg)[0] for p in prompts]
    lengths = {len(a.tokens) for a in alone}
    assert len(lengths) >= 2 and {a.stats.finished_by for a in alone} == {"eos", "length"}, lengths
    for rows in (slice(0, 2), slice(2, 5), slice(0, 8)):
        assert_rows_equal(generate(lm, prompts[rows], mode, cfg), alone[rows], f"{mode} B={block} rows {rows}")


@pytest.mark.parametrize("mode", ["linear_spec", "quadratic_spec"])
def test_sampled_batch_rows_equal_alone(mode):
    lm = tiny_lm("llama", tie=False, initializer_range=0.3)
    prompts = random_prompts(8, 3, min_len=1, max_len=9)
    cfg = DecodeConfig(max_new_tokens=13, block_size=4, temperature=0.9, top_p=0.8, seed=5)
    batch = generate(lm, prompts, mode, cfg)
    alone = [generate(lm, [p], mode, dataclasses.replace(cfg, seed=cfg.seed + r))[0] for r, p in enumerate(prompts)]
    assert_rows_equal(batch, alone, f"{mode} sampled")


@pytest.mark.parametrize("mode", ["linear_spec", "quadratic_spec"])
def test_static_cache_batch_rows_equal_alone(mode):
    """The static cache's per-row re-pack (keep_cache with [b, n] columns) gives the same rows."""
    lm = StaticCachedLM(repetitive_lm().hf, mask_token_id=MASK_ID, capacity=128)
    prompts = random_prompts(77, 3, min_len=1, max_len=12)
    cfg = DecodeConfig(max_new_tokens=15, block_size=4)
    batch = generate(lm, prompts, mode, cfg, return_cache=True)
    for r, p in enumerate(prompts):
        ref = generate(repetitive_lm(), [p], mode, cfg, return_cache=True)[0]
        assert batch[r].tokens == ref.tokens and batch[r].stats == ref.stats, f"row {r}"
        assert [k.shape for k, _ in batch[r].cache] == [k.shape for k, _ in ref.cache], f"row {r} cache"
