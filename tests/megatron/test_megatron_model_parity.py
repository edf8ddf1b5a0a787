"""Megatron model with the two-stream attention vs the torch engine, on the same weights and batch.

* HF → Megatron → HF round trip keeps the weights and the logits;
* one two-stream forward + loss through Megatron (our core attention, RoPE per half and per document,
  Megatron's per-token CE, our forward step's loss function) gives the same AR loss, diffusion loss
  and total as the torch engine (``models.step.joint_step``);
* a Ministral-3 (multimodal wrapper, YaRN RoPE, Llama-4 query scaling, tied → untied) checkpoint
  gives the same losses as its HF language model driven with the core mask and loss;
* the attention respects the pattern (perturbing tokens that must not be seen changes nothing).

Tolerance: float32 on CPU, relative 1e-5 on sums (observed: identical to 7 digits).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.tiny_models import save_tiny_model

REL = 1e-5


def _cfg(tmp_path: Path, model_dir: Path, *extra: str):
    from nemodiff_train.config.load import compose

    return compose(["recipe=tiny_cpu", "engine=megatron", "engine.device=cpu", f"run.dir={tmp_path / 'run'}",
                    "model.mask_token_id=5", f"model.path={model_dir}", *extra])


def _megatron_model(cfg, hf_dir):
    from nemodiff_train.engines.megatron.model import auto_bridge, build_provider

    bridge = auto_bridge(hf_dir=hf_dir)
    prov = build_provider(cfg, bridge, 0, cpu=True)  # finalized, fp32
    model = prov.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
    bridge.load_hf_weights(model)
    for m in model:
        m.eval()
    return bridge, model


def _batch(vocab: int, b: int = 2, length: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(11, vocab, (b, length), generator=g)
    doc = torch.zeros(b, length, dtype=torch.long)
    doc[0, 12:] = 1
    doc[1, 20:] = 1
    doc[1, 27:] = 2
    loss_mask = torch.ones(b, length, dtype=torch.bool)
    loss_mask[1, :5] = False  # an SFT-style prompt: never noised, its tokens are not AR targets
    return {"tokens": x0, "doc_ids": doc, "loss_mask": loss_mask, "sample_index": torch.arange(10, 10 + b),
            "noise_seed": torch.zeros(b, dtype=torch.long)}


def _megatron_losses(cfg, model, sample):
    from nemodiff_train.engines.megatron.step import TwoStreamForwardStep

    d = cfg.diffusion
    step = TwoStreamForwardStep(mask_token_id=cfg.model.mask_token_id, schedule=d.schedule, eps=d.eps,
                                block_size=d.block_size, half_life_ratio=d.half_life_ratio, alpha=d.alpha, beta=d.beta)
    with torch.no_grad():
        out, loss_func = step(None, iter([sample]), model[0])
        num, count, report = loss_func(out)
    return float(num), int(count), {k: (float(v[0]), float(v[1])) for k, v in report.items()}


def _noise(cfg, sample):
    from nemodiff_train.core.noising import apply_noise

    d = cfg.diffusion
    return apply_noise(sample["tokens"], sample["loss_mask"], sample["sample_index"], seed=0,
                       mask_token_id=cfg.model.mask_token_id, schedule=d.schedule, eps=d.eps,
                       block_size=d.block_size, half_life_ratio=d.half_life_ratio)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * max(1.0, abs(b))


@pytest.mark.parametrize("family", ["qwen3", "llama", "qwen2", "mistral"])
def test_joint_loss_matches_torch_engine(tmp_path, dist_ctx, family):
    from nemodiff_train.core.losses import LossWeights
    from nemodiff_train.models.hf import load_dlm
    from nemodiff_train.models.step import MicroBatch, joint_step

    hf_dir = save_tiny_model(tmp_path / family, family, tie=False, initializer_range=0.3)
    cfg = _cfg(tmp_path, hf_dir)
    _, model = _megatron_model(cfg, hf_dir)
    sample = _batch(96)
    num, count, report = _megatron_losses(cfg, model, sample)

    dlm = load_dlm(hf_dir, mask_token=5, untie_head=True)
    noise = _noise(cfg, sample)
    mb = MicroBatch(sample["tokens"], sample["doc_ids"], sample["loss_mask"], noise, 0, 0)
    with torch.no_grad():
        parts = joint_step(dlm, mb, cfg.diffusion.block_size)  # the torch engine's step
    w = LossWeights(cfg.diffusion.alpha, cfg.diffusion.beta)
    assert count == int(parts.denominator(w))
    assert _close(num, float(parts.numerator(w)))
    assert _close(report["ar_loss"][0], float(parts.ar_sum)) and report["ar_loss"][1] == float(parts.ar_count)
    assert _close(report["diffusion_loss"][0], float(parts.diffusion_sum))
    assert report["diffusion_loss"][1] == float(parts.diffusion_count) > 0
    assert _close(report["lm loss"][0] / report["lm loss"][1], float(parts.numerator(w) / parts.denominator(w)))


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_hf_megatron_hf_round_trip_keeps_logits(tmp_path, dist_ctx, family):
    from transformers import AutoModelForCausalLM

    from tests.helpers.tiny_tokenizer import make_tiny_tokenizer

    hf_dir = save_tiny_model(tmp_path / family, family, tie=False, initializer_range=0.3)
    make_tiny_tokenizer(hf_dir)  # the bridge copies tokenizer artifacts along
    cfg = _cfg(tmp_path, hf_dir)
    bridge, model = _megatron_model(cfg, hf_dir)
    out = tmp_path / "exported"
    bridge.save_hf_pretrained(model, out, show_progress=False)
    a = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    b = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    for (ka, va), (kb, vb) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
        assert ka == kb and torch.equal(va, vb), ka


def _tiny_ministral3(path: Path) -> Path:
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralVisionConfig
    from transformers.models.ministral3 import Ministral3Config

    torch.manual_seed(0)
    text = Ministral3Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, tie_word_embeddings=True,
        initializer_range=0.3,
        # original context 16 < L: the YaRN factor and the Llama-4 query scaling are both active
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 32.0, "original_max_position_embeddings": 16,
                         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "llama_4_scaling_beta": 0.1})
    vis = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              head_dim=16, image_size=64, patch_size=16)
    conf = Mistral3Config(text_config=text.to_dict(), vision_config=vis.to_dict(), tie_word_embeddings=True,
                          image_token_index=10, spatial_merge_size=2)
    Mistral3ForConditionalGeneration(conf).eval().save_pretrained(path)
    return path


def test_ministral3_matches_hf_language_model(tmp_path, dist_ctx):
    """Multimodal Ministral-3 layout: untied by tensor copy, trained as the wrapper's language model."""
    from transformers import Mistral3ForConditionalGeneration

    from nemodiff_train.core.losses import LossWeights, joint_loss_parts
    from nemodiff_train.core.masks import SequenceLayout, dense_mask
    from nemodiff_train.core.sequence import two_stream_inputs
    from nemodiff_train.engines.megatron.model import prepare_init_checkpoint

    src = _tiny_ministral3(tmp_path / "m3")
    cfg = _cfg(tmp_path, src)
    hf_dir = prepare_init_checkpoint(cfg, tmp_path / "run", True, src=src)
    assert hf_dir != src  # tied source: rewritten with lm_head = copy of the embedding
    _, model = _megatron_model(cfg, hf_dir)
    sd = model[0].state_dict()
    assert torch.equal(sd["language_model.embedding.word_embeddings.weight"], sd["language_model.output_layer.weight"])
    sample = _batch(128)
    num, count, report = _megatron_losses(cfg, model, sample)

    ref = Mistral3ForConditionalGeneration.from_pretrained(hf_dir, attn_implementation="sdpa").float().eval()
    noise = _noise(cfg, sample)
    x0, doc = sample["tokens"], sample["doc_ids"]
    inputs = two_stream_inputs(noise.noisy_ids, x0, doc)
    mask = dense_mask("two_stream", SequenceLayout(x0.shape[1], cfg.diffusion.block_size, doc))
    with torch.no_grad():
        hidden = ref.model.language_model(input_ids=inputs.input_ids, position_ids=inputs.position_ids,
                                          attention_mask=mask, use_cache=False).last_hidden_state
        parts = joint_loss_parts(hidden, ref.lm_head, x0, noise.masked, noise.mask_prob, sample["loss_mask"], doc)
    w = LossWeights(cfg.diffusion.alpha, cfg.diffusion.beta)
    assert count == int(parts.denominator(w))
    assert _close(num, float(parts.numerator(w)))
    assert _close(report["ar_loss"][0], float(parts.ar_sum))
    assert _close(report["diffusion_loss"][0], float(parts.diffusion_sum))


def test_attention_respects_the_two_stream_pattern(tmp_path, dist_ctx):
    """Changing what a position must not see leaves its output unchanged; what it may see changes it."""
    from nemodiff_train.core.sequence import two_stream_inputs

    hf_dir = save_tiny_model(tmp_path / "q", "qwen3", tie=False, initializer_range=0.3)
    cfg = _cfg(tmp_path, hf_dir)  # block 8
    _, model = _megatron_model(cfg, hf_dir)
    L, B = 32, cfg.diffusion.block_size
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(11, 96, (1, L), generator=g)
    xt = torch.where(torch.rand(1, L, generator=g) < 0.5, torch.full_like(x0, 5), x0)
    doc = torch.zeros(1, L, dtype=torch.long)

    def logits(noisy, clean):
        inp = two_stream_inputs(noisy, clean, doc)
        with torch.no_grad():
            return model[0](input_ids=inp.input_ids, position_ids=inp.position_ids, attention_mask=doc).float()

    base = logits(xt, x0)
    # (1) change noisy block 1 only: clean rows and the other noisy blocks must not move
    xt2 = xt.clone()
    xt2[:, B:2 * B] = (xt2[:, B:2 * B] + 7) % 90 + 6
    d1 = (logits(xt2, x0) - base).abs().amax(dim=(0, 2))
    moved = torch.zeros(2 * L, dtype=torch.bool)
    moved[B:2 * B] = True
    assert float(d1[~moved].max()) < 1e-5 and float(d1[moved].min()) > 1e-4
    # (2) change clean tokens from position 2B on: clean rows < 2B and noisy blocks 0..2 must not move
    x02 = x0.clone()
    x02[:, 2 * B:] = (x02[:, 2 * B:] + 7) % 90 + 6
    d2 = (logits(xt, x02) - base).abs().amax(dim=(0, 2))
    still = torch.zeros(2 * L, dtype=torch.bool)
    still[: 3 * B] = True  # noisy blocks 0, 1, 2 see clean blocks < their own only
    still[L: L + 2 * B] = True  # clean stream is causal
    assert float(d2[still].max()) < 1e-5
    assert float(d2[3 * B: L].min()) > 1e-4  # noisy block 3 sees clean block 2


def test_documents_are_isolated_and_positions_restart(tmp_path, dist_ctx):
    """A packed row behaves like its documents run one by one (RoPE positions restart per document)."""
    from nemodiff_train.core.sequence import two_stream_inputs

    hf_dir = save_tiny_model(tmp_path / "q", "qwen3", tie=False, initializer_range=0.3)
    cfg = _cfg(tmp_path, hf_dir)
    _, model = _megatron_model(cfg, hf_dir)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(11, 96, (1, 16), generator=g), torch.randint(11, 96, (1, 16), generator=g)
    packed = torch.cat([a, b], dim=1)
    doc = torch.cat([torch.zeros(1, 16), torch.ones(1, 16)], dim=1).long()

    def run(x, d):
        inp = two_stream_inputs(x, x, d)
        with torch.no_grad():
            return model[0](input_ids=inp.input_ids, position_ids=inp.position_ids, attention_mask=d).float()

    whole = run(packed, doc)
    alone = run(b, torch.zeros(1, 16, dtype=torch.long))
    # document b's clean and noisy rows in the packed run equal b run alone
    torch.testing.assert_close(whole[:, 48:64], alone[:, 16:32], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(whole[:, 16:32], alone[:, 0:16], rtol=1e-4, atol=1e-4)
