"""One attention path for every implementation: sdpa (boolean), eager (additive float), flex (BlockMask).

The same weights loaded with sdpa and with eager give the same two-stream hidden states (both halves)
and the same decoding outputs in every mode; before, eager received the boolean mask and *added* it,
masking nothing. flex_attention cannot run through transformers on this CPU (its compiled kernel does
not build here), so its masks are checked at the kernel: torch's flex_attention with our BlockMasks
against SDPA with the dense masks (tests/gpu runs the whole model with flex on CUDA).
"""

import pytest
import torch
import torch.nn.functional as F

from nemodiff_train.core.masks import SequenceLayout, dense_mask, flex_block_mask
from nemodiff_train.decoding import DecodeConfig, generate
from nemodiff_train.models.attention import (UnsupportedModelError, check_implementation, dense_block_mask,
                                             implementation_form)
from nemodiff_train.models.cached import HFCachedLM
from nemodiff_train.models.hf import DLMModel, DLMSettings
from tests.helpers.arch_matrix import arch_model
from tests.helpers.decoding import one_thread  # noqa: F401  (autouse fixture)

pytestmark = pytest.mark.unit
MASK = 3


def _pair(name, **kw):
    """The same random weights, loaded once with sdpa and once with eager."""
    return arch_model(name, attn_implementation="sdpa", **kw), arch_model(name, attn_implementation="eager", **kw)


@pytest.mark.parametrize("name", ["llama_untied", "qwen2_window", "mistral_window"])
def test_training_forward_is_the_same_in_sdpa_and_eager(name):
    sdpa, eager = _pair(name)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(4, 96, (2, 32), generator=g)
    xt = torch.where(torch.rand(2, 32, generator=g) < 0.5, torch.full_like(x0, MASK), x0)
    docs = torch.tensor([[0] * 32, [0] * 11 + [1] * 21])
    outs = {}
    for impl, model in (("sdpa", sdpa), ("eager", eager)):
        dlm = DLMModel(model, DLMSettings(mask_token_id=MASK, train_block_size=8))
        with torch.no_grad():
            outs[impl] = dlm.head(dlm.two_stream_hidden(xt, x0, docs))
        if impl == "eager":
            mask = dlm.attention_mask(SequenceLayout(32, 8, docs), 2, torch.device("cpu"))
            one = mask if torch.is_tensor(mask) else next(iter(mask.values()))
            assert one.dtype == torch.float32  # additive, in the model dtype
            with torch.no_grad():
                ref = model(input_ids=x0[:1], use_cache=False).logits
            assert (outs[impl][:1, 32:] - ref).abs().max().item() <= 1e-5  # clean half = AR, in eager too
    assert (outs["sdpa"] - outs["eager"]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["llama_untied", "qwen2_window"])
def test_decoding_is_the_same_in_sdpa_and_eager(name):
    sdpa, eager = _pair(name, initializer_range=0.1)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [20, 21, 22]]
    cfg = DecodeConfig(max_new_tokens=12, block_size=4, threshold=0.5)
    lms = {impl: HFCachedLM(m, mask_token_id=MASK) for impl, m in (("sdpa", sdpa), ("eager", eager))}
    for mode in ("ar", "diffusion", "linear_spec", "quadratic_spec"):
        got = {impl: [(list(r.tokens), r.stats.forwards) for r in generate(lm, prompts, mode, cfg)]
               for impl, lm in lms.items()}
        assert got["sdpa"] == got["eager"], mode
    # one bidirectional (draft-style) pass reading a cache: the logits themselves agree
    logits = {}
    for impl, lm in lms.items():
        cache = lm.new_cache(1)
        lm.forward(cache, torch.tensor([prompts[0]]), torch.arange(12)[None], torch.ones(12, 12).tril().bool()[None], True)
        block = torch.tensor([[7, MASK, MASK, MASK]])
        mask = torch.ones(1, 4, 16, dtype=torch.bool)
        logits[impl] = lm.forward(cache, block, torch.arange(12, 16)[None], mask, write_cache=False)
        assert lm.cache_length(cache) == 12
    assert (logits["sdpa"] - logits["eager"]).abs().max().item() <= 1e-5


def test_eager_form_is_additive_in_the_model_dtype():
    allowed = torch.tensor([[[[True, False], [True, True]]]])
    for dtype in (torch.float32, torch.bfloat16):
        form = implementation_form(allowed, "eager", dtype)
        assert form.dtype == dtype
        assert form[0, 0, 0, 0] == 0 and form[0, 0, 1, 1] == 0
        assert form[0, 0, 0, 1] == torch.finfo(dtype).min  # exp(min - max) == 0 exactly: masked
    assert implementation_form(allowed, "sdpa", torch.float32) is allowed


def _flex(q, k, v, block_mask):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=block_mask)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_masks_attend_like_the_dense_masks():
    g = torch.Generator().manual_seed(3)
    docs = torch.tensor([[0] * 9 + [1] * 15])
    layout = SequenceLayout(24, 4, docs)
    for window in (None, 6):  # training: the pattern's BlockMask, windowed or not
        dense = dense_mask("two_stream", layout, 1, window=window)
        q, k, v = (torch.randn(1, 2, 48, 8, generator=g) for _ in range(3))
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        got = _flex(q, k, v, flex_block_mask("two_stream", layout, 1, device="cpu", window=window))
        assert (got - ref).abs().max().item() <= 1e-5
    # decoding: an arbitrary dense mask over cached + new keys (q != k lengths)
    allowed = torch.rand(2, 1, 5, 19, generator=g) < 0.5
    allowed[..., -5:] |= torch.eye(5, dtype=torch.bool)
    q = torch.randn(2, 2, 5, 8, generator=g)
    k, v = (torch.randn(2, 2, 19, 8, generator=g) for _ in range(2))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    assert (_flex(q, k, v, dense_block_mask(allowed)) - ref).abs().max().item() <= 1e-5


def test_kernels_without_arbitrary_masks_are_refused():
    with pytest.raises(UnsupportedModelError, match="flash_attention_2.*sdpa"):
        check_implementation("flash_attention_2")
    model = arch_model("llama_untied")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="flash_attention_2"):
        DLMModel(model, DLMSettings(mask_token_id=MASK))
    with pytest.raises(UnsupportedModelError, match="flash_attention_2"):
        HFCachedLM(model, mask_token_id=MASK)


def test_architecture_without_sdpa_is_refused_sdpa_and_gets_eager_by_default():
    from nemodiff_train.models.arch import pick_attn_implementation
    from tests.helpers.arch_matrix import arch_config

    config = arch_config("gemma2")
    assert pick_attn_implementation(config, "cpu") == "eager"
    assert pick_attn_implementation(config, "cuda") == "flex_attention"
    with pytest.raises(UnsupportedModelError, match="Gemma2ForCausalLM.*does not support"):
        pick_attn_implementation(config, "cpu", "sdpa")
    assert pick_attn_implementation(arch_config("llama_untied"), "cpu") == "sdpa"
