"""Drafter adapters on CUDA (models/adapter.py through models/static_cache.py): with a random adapter, the
static cache with and without CUDA-graph replay decodes every mode like the eager dynamic path, one graph
per (batch, q) shape serves draft and verify passes (the gate is a static input), and self-speculation
equals plain transformers generate() on the untouched base. tests/unit/test_adapter.py is the CPU half."""

from __future__ import annotations

import copy

import pytest
import torch

from nemodiff_train.decoding import MODES, DecodeConfig, generate
from nemodiff_train.models.adapter import attach_adapter
from nemodiff_train.models.cached import HFCachedLM
from nemodiff_train.models.static_cache import StaticCachedLM
from tests.helpers.decoding import MASK_ID, random_prompts
from tests.helpers.tiny_models import tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def drafter(dtype):
    base = tiny_model("qwen3", tie=False, initializer_range=1.0).to("cuda", dtype)
    model = copy.deepcopy(base)
    adapter = attach_adapter(model, MASK_ID, rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.5).to(p.device, p.dtype))
    return base, model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [4, 8])
def test_adapter_static_and_graphs_equal_eager_dynamic(dtype, block):
    base, model = drafter(dtype)
    dyn = HFCachedLM(model, mask_token_id=MASK_ID)
    sta = StaticCachedLM(model, mask_token_id=MASK_ID, capacity=512)
    graphs = StaticCachedLM(model, mask_token_id=MASK_ID, capacity=512, cuda_graphs=True)
    prompts = random_prompts(block, 3, min_len=3, max_len=16)
    for mode in sorted(MODES):
        group = prompts if mode in ("ar", "diffusion") else prompts[:1]
        cfg = DecodeConfig(max_new_tokens=2 * block + 3, block_size=block)
        ref = [r.tokens for r in generate(dyn, group, mode, cfg)]
        for lm in (sta, graphs):
            assert [r.tokens for r in generate(lm, group, mode, cfg)] == ref, (mode, dtype, lm.cuda_graphs)
    # one capture for the (1, block) shape serves the draft (gate on) and the verify (gate off) passes
    assert (1, block) in graphs._graphs and graphs._graphs[(1, block)].gate is not None
    if dtype == torch.float32:  # bf16: the base's own generate() reduces in another order
        for prompt in prompts:
            n = 2 * block + 3
            want = base.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, bad_words_ids=[[MASK_ID]], eos_token_id=None,
                                 pad_token_id=0)[0, len(prompt):].tolist()
            for mode in ("linear_spec", "quadratic_spec"):
                got = generate(graphs, [prompt], mode, DecodeConfig(max_new_tokens=n, block_size=block))[0].tokens
                assert got == want, (mode, prompt)
