"""Sliding windows (masks, refusals, decoding past the window), the training head, the mask token.

Sliding-window choice (README "Supported architectures"): a window W lets a query see keys fewer
than W RoPE positions behind it (transformers' rule), applied in the two-stream row to both streams
(noisy queries see clean and noisy keys by the same rule) and in every decoding mask, per layer when
layer types differ; the decoding cache keeps every key. Layer types other than full and sliding
attention, or per-layer windows in a decoder that takes one mask, are refused.
"""

import pytest
import torch

from nemodiff_train.core.losses import joint_loss_parts
from nemodiff_train.core.masks import PATTERNS, SequenceLayout, dense_mask
from nemodiff_train.decoding import DecodeConfig, generate
from nemodiff_train.models.arch import layer_windows
from nemodiff_train.models.attention import UnsupportedModelError
from nemodiff_train.models.cached import HFCachedLM
from nemodiff_train.models.hf import DLMModel, DLMSettings, resolve_mask_token, untie_output_head
from tests.helpers.arch_matrix import arch_config, arch_model
from tests.helpers.decoding import one_thread  # noqa: F401  (autouse fixture)

pytestmark = pytest.mark.unit
MASK = 3


def _reference_window_mask(pattern: str, doc: list[int], block: int, window: int) -> torch.Tensor:
    """The rule written out with loops: the pattern without a window, and pos(q) - pos(k) < window."""
    length = len(doc)
    pos, start = [], 0
    for i, d in enumerate(doc):
        if i > 0 and d != doc[i - 1]:
            start = i
        pos.append(i - start)
    base = dense_mask(pattern, SequenceLayout(length, block, torch.tensor([doc])), 1)[0, 0]
    s = base.shape[0]
    out = torch.zeros(s, s, dtype=torch.bool)
    for q in range(s):
        for k in range(s):
            out[q, k] = bool(base[q, k]) and pos[q % length] - pos[k % length] < window
    return out


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_window_mask_follows_the_position_rule(pattern):
    doc = [0] * 7 + [1] * 13
    got = dense_mask(pattern, SequenceLayout(20, 4, torch.tensor([doc])), 1, window=5)[0, 0]
    assert torch.equal(got, _reference_window_mask(pattern, doc, 4, 5))
    assert not torch.equal(got, dense_mask(pattern, SequenceLayout(20, 4, torch.tensor([doc])), 1)[0, 0])


def test_layer_windows_per_family():
    assert layer_windows(arch_config("mistral_window")).windows == (8, 8)
    assert layer_windows(arch_config("mistral")).windows == (None, None)
    mixed = layer_windows(arch_config("gemma2"))
    assert mixed.by_type() == {"sliding_attention": 8, "full_attention": None}
    assert layer_windows(arch_config("qwen2_window")).windows == (None, 8)
    assert layer_windows(arch_config("qwen2_window", use_sliding_window=False)).windows == (None, None)


def test_unknown_layer_types_and_unexpressible_windows_are_refused():
    config = arch_config("qwen2_window")
    config.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(UnsupportedModelError, match="chunked_attention"):
        layer_windows(config)
    # a decoder whose forward takes ONE mask (Llama) cannot apply different windows per layer
    model = arch_model("llama_untied")
    model.config.layer_types = ["full_attention", "sliding_attention"]
    model.config.sliding_window = 8
    with pytest.raises(UnsupportedModelError, match="one attention mask for all layers"):
        DLMModel(model, DLMSettings(mask_token_id=MASK))


@pytest.mark.parametrize("name", ["mistral_window", "gemma2"])
def test_decoding_far_past_the_window_equals_uncached_greedy(name):
    """Prompt and output much longer than the window: the sliding cache used to crash here."""
    model = arch_model(name, initializer_range=0.1)
    lm = HFCachedLM(model, mask_token_id=MASK)
    prompt = list(range(10, 30))  # 20 tokens, window 8
    cfg = DecodeConfig(max_new_tokens=12, block_size=4)
    ours = list(generate(lm, [prompt], "ar", cfg)[0].tokens)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
            logits[MASK] = float("-inf")
            seq.append(int(logits.argmax()))
    assert ours == seq[len(prompt):]
    for mode in ("linear_spec", "quadratic_spec"):
        assert list(generate(lm, [prompt], mode, cfg)[0].tokens) == ours, mode


@pytest.mark.parametrize("name", ["granite", "gemma2"])
def test_training_loss_is_the_models_own_cross_entropy(name):
    """Granite divides logits by logits_scaling, Gemma-2 soft-caps them: the AR loss the trainer
    computes (chunked, recomputed in backward) equals the CE of the HF forward's logits."""
    model = arch_model(name)
    untie_output_head(model)
    dlm = DLMModel(model, DLMSettings(mask_token_id=MASK, train_block_size=8))
    g = torch.Generator().manual_seed(4)
    x0 = torch.randint(4, 96, (2, 24), generator=g)
    masked = torch.rand(2, 24, generator=g) < 0.5
    xt = torch.where(masked, torch.full_like(x0, MASK), x0)
    hidden = dlm.two_stream_hidden(xt, x0)
    parts = joint_loss_parts(hidden, dlm.head, x0, masked, torch.full((2, 24), 0.5), torch.ones_like(x0),
                             chunk_size=7)
    parts.ar_sum.backward()
    assert model.get_output_embeddings().weight.grad is not None
    with torch.no_grad():
        logits = model(input_ids=x0, use_cache=False).logits
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), x0[:, 1:].reshape(-1), reduction="sum")
        raw = model.get_output_embeddings()(hidden[:, 24:])  # what skipping the architecture's head gives
    assert abs(parts.ar_sum.item() - ref.item()) <= 1e-4 * ref.item()
    assert (raw - logits).abs().max().item() > 1e-3  # the head transform matters for this config


def test_added_mask_token_keeps_every_other_special_token(tmp_path):
    from transformers import AutoTokenizer

    from tests.helpers.tiny_tokenizer import make_tiny_tokenizer

    tok = make_tiny_tokenizer(tmp_path / "tok")
    before = set(tok.all_special_tokens)
    assert {"<|im_start|>", "<|im_end|>"} <= before
    model = arch_model("llama_untied", vocab_size=len(tok))
    mask_id = resolve_mask_token(model, tok)
    assert set(tok.all_special_tokens) == before | {"<|mask|>"}
    tok.save_pretrained(tmp_path / "saved")
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert set(again.all_special_tokens) == before | {"<|mask|>"}
    assert again.convert_tokens_to_ids("<|mask|>") == mask_id
