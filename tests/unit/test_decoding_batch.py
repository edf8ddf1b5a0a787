"""Batched AR and diffusion (left-padded prompts of different lengths) equal decoding each prompt alone:
tokens and per-row counts, greedy and sampled (row r samples with seed ``cfg.seed + r``)."""

import dataclasses

import pytest

from nemodiff_train.decoding import DecodeConfig, ar_generate, diffusion_generate
from tests.helpers.decoding import one_thread, random_prompts, tiny_lm  # noqa: F401

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("decoder", [ar_generate, diffusion_generate], ids=["ar", "diffusion"])
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_batch_equals_one_by_one(decoder, family):
    lm = tiny_lm(family, tie=False, initializer_range=0.3)
    prompts = random_prompts(11, 4, min_len=1, max_len=10)
    prompts[1] = prompts[1][:1]  # a one-token prompt next to longer ones: lots of left padding
    # pick an EOS the first row emits mid-way, so rows finish at different steps
    probe = decoder(lm, prompts[:1], DecodeConfig(max_new_tokens=14, block_size=4))[0].tokens
    settings = [dict(), dict(threshold=None, steps_per_block=2), dict(temperature=0.9, top_p=0.8, seed=5),
                # the left-to-right rules; prefix_ar rows end their blocks at different places
                dict(commit_rule="prefix", threshold=0.1), dict(commit_rule="prefix_ar", threshold=0.1),
                dict(commit_rule="prefix_ar", threshold=0.1, temperature=0.9, seed=3)]
    for extra in settings:
        cfg = DecodeConfig(max_new_tokens=14, block_size=4, eos_token_ids=(probe[6],), **extra)
        batch = decoder(lm, prompts, cfg)
        for r, prompt in enumerate(prompts):
            alone = decoder(lm, [prompt], dataclasses.replace(cfg, seed=cfg.seed + r))[0]
            assert batch[r].tokens == alone.tokens, f"row {r} ({extra})"
            assert batch[r].stats == alone.stats, f"row {r} ({extra})"
        assert batch[0].stats.finished_by == "eos" or extra.get("temperature")
