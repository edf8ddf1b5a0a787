"""The two-stream forward through real HF modules: AR preservation, locality, mask token, untied head."""

import pytest
import torch

from nemodiff_train.models.hf import DLMModel, DLMSettings, load_dlm, untie_output_head
from tests.helpers.tiny_models import FAMILIES, save_tiny_model, tiny_model

pytestmark = pytest.mark.unit
MASK = 3


def _dlm(family, block=4):
    model = tiny_model(family)
    untie_output_head(model)
    return DLMModel(model, DLMSettings(mask_token_id=MASK, train_block_size=block))


@pytest.mark.parametrize("family", FAMILIES)
def test_clean_stream_equals_causal_model(family):
    torch.manual_seed(1)
    dlm = _dlm(family)
    x0 = torch.randint(4, 96, (2, 16))
    xt = torch.where(torch.rand(2, 16) < 0.5, torch.full_like(x0, MASK), x0)
    with torch.no_grad():
        clean = dlm.head(dlm.two_stream_hidden(xt, x0)[:, 16:])
        ref = dlm.causal_logits(x0)
    assert (clean - ref).abs().max().item() <= 1e-5


def test_packed_clean_stream_equals_each_document_alone():
    torch.manual_seed(2)
    dlm = _dlm("qwen3")
    x0 = torch.randint(4, 96, (1, 12))
    docs = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        clean = dlm.head(dlm.two_stream_hidden(x0, x0, docs)[:, 12:])
        first = dlm.causal_logits(x0[:, :5])
        second = dlm.causal_logits(x0[:, 5:])
    assert (clean[:, :5] - first).abs().max() <= 1e-5
    assert (clean[:, 5:] - second).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_noisy_block_only_sees_its_block_and_earlier_clean_blocks(family):
    torch.manual_seed(3)
    B, L = 4, 16
    dlm = _dlm(family, block=B)
    x0 = torch.randint(4, 96, (1, L))
    xt = torch.where(torch.rand(1, L) < 0.5, torch.full_like(x0, MASK), x0)
    with torch.no_grad():
        base = dlm.head(dlm.two_stream_hidden(xt, x0)[:, :L])
        for b in range(L // B):
            start = b * B
            # change every later noisy token and every clean token at or after the block start
            xt2, x02 = xt.clone(), x0.clone()
            xt2[:, start + B:] = torch.randint(4, 96, (1, L - start - B))
            x02[:, start:] = torch.randint(4, 96, (1, L - start))
            out = dlm.head(dlm.two_stream_hidden(xt2, x02)[:, :L])
            assert torch.allclose(out[:, start:start + B], base[:, start:start + B], atol=1e-6), b
            if b > 0:  # and the earlier clean tokens do matter
                x03 = x0.clone()
                x03[:, start - 1] = (x0[:, start - 1] + 1) % 90 + 4
                out3 = dlm.head(dlm.two_stream_hidden(xt, x03)[:, :L])
                assert not torch.allclose(out3[:, start:start + B], base[:, start:start + B])


def test_load_adds_mask_token_with_mean_row_and_unties(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    save_tiny_model(tmp_path, "qwen3", vocab_size=96, tie=True)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(tmp_path)
    base = tiny_model("qwen3", vocab_size=96, tie=True)
    dlm = load_dlm(tmp_path)
    assert dlm.settings.mask_token_id == 96
    emb = dlm.hf.get_input_embeddings().weight
    assert emb.shape[0] >= 97
    assert torch.allclose(emb[96], base.get_input_embeddings().weight.mean(0), atol=1e-6)
    assert dlm.hf.get_output_embeddings().weight.data_ptr() != emb.data_ptr()
    assert dlm.hf.config.tie_word_embeddings is False
    assert torch.allclose(dlm.hf.get_output_embeddings().weight[:96], base.lm_head.weight)


def test_load_with_reserved_id_and_bad_id(tmp_path):
    save_tiny_model(tmp_path, "llama")
    assert load_dlm(tmp_path, mask_token=5).settings.mask_token_id == 5
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        load_dlm(tmp_path, mask_token=1000)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_dlm(tmp_path / "missing")


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_training_noisy_view_equals_decoding_view(family):
    """A noisy block's training logits equal a decoding pass over the causal KV cache of the earlier
    clean blocks (docs/method.md, "Attention pattern"): what diffusion training teaches is what decoding asks."""
    from nemodiff_train.models.cached import HFCachedLM

    torch.manual_seed(4)
    B, L = 4, 16
    dlm = _dlm(family, block=B)
    lm = HFCachedLM(dlm)
    x0 = torch.randint(4, 96, (1, L))
    xt = torch.where(torch.rand(1, L) < 0.5, torch.full_like(x0, MASK), x0)
    with torch.no_grad():
        noisy = dlm.head(dlm.two_stream_hidden(xt, x0)[:, :L])
    for b in range(L // B):
        start = b * B
        cache = lm.new_cache(1)
        if start:
            lm.forward(cache, x0[:, :start], torch.arange(start)[None],
                       torch.ones(start, start, dtype=torch.bool).tril()[None], write_cache=True)
        logits = lm.forward(cache, xt[:, start:start + B], torch.arange(start, start + B)[None],
                            torch.ones(1, B, start + B, dtype=torch.bool), write_cache=False)
        assert lm.cache_length(cache) == start
        assert torch.allclose(logits, noisy[:, start:start + B], atol=1e-5), b
