"""Batched self-speculation on CUDA (tests/unit/test_decoding_batched_spec.py and test_decoding_host_syncs.py
are the CPU halves): fp32 rows of a ragged batch equal each prompt decoded alone through the static cache
with CUDA graphs, and a cycle makes at most one synchronizing CUDA call, counted by CUDA itself
(``torch.cuda.set_sync_debug_mode``, which also sees syncs inside C++ such as boolean-mask indexing)."""

from __future__ import annotations

import warnings

import pytest
import torch

from nemodiff_train.decoding import DecodeConfig, generate
from nemodiff_train.models.static_cache import StaticCachedLM
from tests.helpers.decoding import MASK_ID, random_prompts
from tests.helpers.tiny_models import tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SPEC = ("linear_spec", "quadratic_spec")


def static_lm(graphs: bool) -> StaticCachedLM:
    model = tiny_model("qwen3", tie=False, initializer_range=0.1).to("cuda", torch.float32)
    return StaticCachedLM(model, mask_token_id=MASK_ID, capacity=512, cuda_graphs=graphs)


@pytest.mark.parametrize("block", [4, 16])
def test_batch_rows_equal_alone_with_graphs(block):
    lm = static_lm(graphs=True)
    prompts = random_prompts(block, 8, min_len=1, max_len=20)
    for mode in SPEC:
        probe = generate(lm, prompts[:1], mode, DecodeConfig(max_new_tokens=2 * block + 3, block_size=block))[0]
        cfg = DecodeConfig(max_new_tokens=2 * block + 3, block_size=block, eos_token_ids=(probe.tokens[block],))
        batch = generate(lm, prompts, mode, cfg)
        for r, p in enumerate(prompts):
            alone = generate(lm, [p], mode, cfg)[0]
            assert batch[r].tokens == alone.tokens and batch[r].stats == alone.stats, (mode, block, r)
    assert (len(prompts), block) in lm._graphs and (len(prompts), block * (block + 1)) in lm._graphs


class CycleProbe:
    """Notes how many sync warnings CUDA raised so far at every cache-writing forward after the prefill."""

    def __init__(self, lm, seen: list):
        self.lm, self.seen, self.at_cycle = lm, seen, []
        self.mask_token_id, self.vocab_size, self.device = lm.mask_token_id, lm.vocab_size, lm.device

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def forward(self, cache, input_ids, position_ids, attention_mask, write_cache, **kw):
        if write_cache and self.lm.cache_length(cache) > 0:
            self.at_cycle.append(len(self.seen))
        return self.lm.forward(cache, input_ids, position_ids, attention_mask, write_cache, **kw)


@pytest.mark.parametrize("mode", ["ar", *SPEC])
def test_one_synchronizing_call_per_cycle(mode):
    lm = static_lm(graphs=True)
    prompts = random_prompts(3, 4, min_len=3, max_len=12)
    cfg = DecodeConfig(max_new_tokens=24, block_size=4)
    generate(lm, prompts, mode, cfg)  # capture the graphs first (capture itself synchronises)
    probe = CycleProbe(lm, [])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        probe.seen = seen
        torch.cuda.set_sync_debug_mode("warn")
        try:
            generate(probe, prompts, mode, cfg)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    per_cycle = [b - a for a, b in zip(probe.at_cycle, probe.at_cycle[1:])]
    assert len(per_cycle) >= 4 and max(per_cycle) <= 1, (per_cycle, [str(w.message)[:120] for w in seen][:6])
