"""The architecture matrix, in memory: the training view and the decoders against plain transformers.

For every entry of tests/helpers/arch_matrix.py (Llama tied/untied, Qwen2 with windows on some
layers, Qwen3, Mistral with and without a window, Phi-3 with a window, OLMo-2, Granite with
``logits_scaling`` = 8, Gemma-2 with alternating windows and soft-capping, eager only):

* the clean half of the two-stream forward, through the training head, equals the HF forward's
  logits (fp32, <= 1e-5) on sequences longer than the window; a head that skips the architecture's
  logit processing, or a mask that ignores a window, fails this;
* ``ar`` equals transformers ``generate()`` (greedy, mask token suppressed as our decoders ban it) on
  prompts longer than the window, batched with left padding; linear and quadratic self-speculation
  equal ``ar`` token for token (a sliding cache that drops keys crashed or diverged here).
"""

import pytest
import torch

from nemodiff_train.decoding import DecodeConfig, generate
from nemodiff_train.models.cached import HFCachedLM
from nemodiff_train.models.hf import DLMModel, DLMSettings, untie_output_head
from tests.helpers.arch_matrix import ARCHS, arch_model
from tests.helpers.decoding import one_thread  # noqa: F401  (autouse fixture)

pytestmark = pytest.mark.unit
MASK = 3
L = 32  # 4x the window


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_training_view_ar_logits_equal_hf_logits(name):
    model = arch_model(name)
    untie_output_head(model)
    dlm = DLMModel(model, DLMSettings(mask_token_id=MASK, train_block_size=8))
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(4, 96, (2, L), generator=g)
    xt = torch.where(torch.rand(2, L, generator=g) < 0.5, torch.full_like(x0, MASK), x0)
    with torch.no_grad():
        clean = dlm.head(dlm.two_stream_hidden(xt, x0)[:, L:])
        ref = model(input_ids=x0, use_cache=False).logits
    assert clean.shape == ref.shape
    assert (clean - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_decoders_match_transformers_generate(name):
    model = arch_model(name, initializer_range=0.1)  # peaked outputs: drafts get accepted sometimes
    lm = HFCachedLM(model, mask_token_id=MASK)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(4, 96, (13,), generator=g).tolist(), torch.randint(4, 96, (3,), generator=g).tolist()]
    cfg = DecodeConfig(max_new_tokens=14, block_size=4)
    ar = [list(r.tokens) for r in generate(lm, prompts, "ar", cfg)]  # batched: left padding + windows
    for prompt, ours in zip(prompts, ar):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=14, do_sample=False, suppress_tokens=[MASK],
                             pad_token_id=0, eos_token_id=None)
        assert ours == ref[0, len(prompt):].tolist()
    for mode in ("linear_spec", "quadratic_spec"):
        assert [list(r.tokens) for r in generate(lm, prompts, mode, cfg)] == ar, mode
