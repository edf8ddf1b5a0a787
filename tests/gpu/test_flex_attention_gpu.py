"""flex_attention end to end on CUDA: the same weights in flex and sdpa give the same training view and
the same decoding outputs (on CPU transformers' compiled flex kernel does not build, so
tests/unit/test_arch_attention.py checks our BlockMasks at the kernel there)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.arch_matrix import arch_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
MASK = 3


@pytest.mark.parametrize("name", ["llama_untied", "qwen2_window", "gemma2"])
def test_flex_matches_the_other_implementations(name):
    from nemodiff_train.decoding import DecodeConfig, generate
    from nemodiff_train.models.cached import HFCachedLM
    from nemodiff_train.models.hf import DLMModel, DLMSettings

    other = "eager" if name == "gemma2" else "sdpa"
    # head_dim 16: the compiled flex kernel refuses head dims below 16 (the matrix's default is 8)
    models = {impl: arch_model(name, attn_implementation=impl, initializer_range=0.1, hidden_size=64, head_dim=16,
                               **({"query_pre_attn_scalar": 16} if name == "gemma2" else {})).cuda()
              for impl in ("flex_attention", other)}
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(4, 96, (2, 64), generator=g).cuda()
    xt = torch.where(torch.rand(2, 64, generator=g).cuda() < 0.5, torch.full_like(x0, MASK), x0)
    docs = torch.tensor([[0] * 64, [0] * 20 + [1] * 44]).cuda()
    hidden = {}
    for impl, model in models.items():
        dlm = DLMModel(model, DLMSettings(mask_token_id=MASK, train_block_size=8))
        with torch.no_grad():
            hidden[impl] = dlm.head(dlm.two_stream_hidden(xt, x0, docs))
    assert (hidden["flex_attention"] - hidden[other]).abs().max().item() <= 1e-4
    prompts = [list(range(10, 30)), [40, 41, 42]]
    cfg = DecodeConfig(max_new_tokens=12, block_size=4)
    for mode in ("ar", "linear_spec", "quadratic_spec"):
        got = {impl: [r.tokens for r in generate(HFCachedLM(m, mask_token_id=MASK), prompts, mode, cfg)]
               for impl, m in models.items()}
        assert got["flex_attention"] == got[other], mode
