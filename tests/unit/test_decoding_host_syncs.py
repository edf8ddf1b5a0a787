"""At most one host sync per decoding cycle (docs/decoding.md, "Host syncs"), counted for real: every
``item``/``tolist``/``bool``/``int``/``float``/``numpy``/``nonzero`` call on any tensor (nemodiff_train.bench.syncs)
between two consecutive cycle forwards of a batch, model included."""

import pytest
import torch

from nemodiff_train.bench.syncs import count_host_syncs
from nemodiff_train.decoding import DecodeConfig, generate
from tests.helpers.decoding import one_thread, random_prompts, tiny_lm  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.unit


class SyncProbe:
    """A CachedLM wrapper that notes the host-sync count at the start of every cycle: every cache-writing
    forward after the prefill (an AR step, a speculation verify), or, with ``every_forward``, every forward
    after it (block diffusion, whose cycle is one denoising step or one causal re-encode)."""

    def __init__(self, lm, counter, every_forward=False):
        self.lm, self.counter, self.every_forward, self.at_cycle = lm, counter, every_forward, []
        self.mask_token_id, self.vocab_size, self.device = lm.mask_token_id, lm.vocab_size, lm.device

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def forward(self, cache, input_ids, position_ids, attention_mask, write_cache, **kw):
        if (write_cache or self.every_forward) and self.lm.cache_length(cache) > 0:
            self.at_cycle.append(self.counter.count)
        return self.lm.forward(cache, input_ids, position_ids, attention_mask, write_cache, **kw)


def test_counter_sees_real_reads():
    t = torch.arange(4)
    with count_host_syncs() as syncs:
        t.tolist(), int(t[0]), bool(t.any()), t.sum().item(), t.nonzero(), torch.nonzero(t)
        (t + 1).max()  # no read
    assert syncs.count == 6, dict(syncs.by_kind)
    assert torch.Tensor.__dict__.get("item") is None, "the patch outlived its block"


@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear_spec", "quadratic_spec"])
def test_at_most_one_host_sync_per_cycle(mode):
    lm = tiny_lm("qwen3", tie=False, initializer_range=0.1)
    prompts = random_prompts(3, 4, min_len=2, max_len=11)
    first = generate(lm, prompts[:1], mode, DecodeConfig(max_new_tokens=24, block_size=4))[0]
    cfg = DecodeConfig(max_new_tokens=24, block_size=4, eos_token_ids=(first.tokens[9],))
    with count_host_syncs() as syncs:
        probe = SyncProbe(lm, syncs, every_forward=mode == "diffusion")
        results = generate(probe, prompts, mode, cfg)
    cycles = probe.at_cycle
    assert len(cycles) >= 6
    per_cycle = [b - a for a, b in zip(cycles, cycles[1:])]
    assert max(per_cycle) <= 1, (per_cycle, dict(syncs.by_kind))
    # before the first cycle: at most the status read after the prefill; after the last: its status read
    # and the final read of the results (a handful of tolist calls, independent of the length)
    assert cycles[0] <= 1 and syncs.count - cycles[-1] <= 8, (cycles[0], syncs.count - cycles[-1])
    assert any(r.stats.finished_by == "eos" for r in results)
