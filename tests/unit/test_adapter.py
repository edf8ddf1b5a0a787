"""Drafter adapters (models/adapter.py): a per-token LoRA on a frozen base, switched per pass by the decoders.

The reference for "the base" is always a separate copy of the untouched model (plain transformers),
never the adapted model with its adapter off.
"""

import copy

import pytest
import torch

from nemodiff_train.decoding import DecodeConfig, generate
from nemodiff_train.models.adapter import (MASK_EMBEDDING_KEY, adapter_tokens, attach_adapter, find_adapter,
                                           load_peft_state_dict, merge_adapter, peft_state_dict)
from nemodiff_train.models.cached import HFCachedLM
from nemodiff_train.models.static_cache import StaticCachedLM
from tests.helpers.decoding import MASK_ID, one_thread, random_prompts  # noqa: F401 (autouse fixture)
from tests.helpers.tiny_models import tiny_model

pytestmark = pytest.mark.unit


def randomize(adapter, seed: int = 0, scale: float = 0.5) -> None:
    """A random nonzero adapter (B is zero at init, which would make the adapter a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def adapted(family="qwen3", seed=0, **kw):
    """(untouched base copy, adapted model, adapter): untied head, init 1.0 (outputs change token often)."""
    base = tiny_model(family, seed, tie=False, initializer_range=1.0)
    model = copy.deepcopy(base)
    adapter = attach_adapter(model, MASK_ID, rank=4, alpha=8.0, **kw)
    randomize(adapter, seed)
    return base, model, adapter


def test_base_frozen_and_state_dict_keys_unchanged():
    base, model, adapter = adapted()
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.requires_grad for p in adapter.parameters())
    assert list(model.state_dict()) == list(base.state_dict())  # hooks, not module replacement
    assert find_adapter(model) is adapter
    assert len(adapter.paths) == 2 * 4  # 2 layers x q, k, v, o
    with pytest.raises(ValueError, match="already has"):
        attach_adapter(model, MASK_ID)


def test_unknown_target_module_is_named():
    with pytest.raises(ValueError, match=r"\['qkv'\] match no nn.Linear.*o_proj"):
        attach_adapter(tiny_model(), MASK_ID, target_modules=("o_proj", "qkv"))
    with pytest.raises(ValueError, match="outside the base vocabulary"):
        attach_adapter(tiny_model(), 10_000)


@torch.no_grad()
def test_gate_is_per_token():
    base, model, adapter = adapted()
    ids = torch.tensor([[5, MASK_ID, 9, 11, MASK_ID, 7]])
    ref = base(input_ids=ids).logits
    # off (None or all False) = the untouched base bit for bit
    assert torch.equal(model(input_ids=ids).logits, ref)
    with adapter_tokens(model, torch.zeros(1, 6, dtype=torch.bool)):
        assert torch.equal(model(input_ids=ids).logits, ref)
    # on from token 3: causal, so tokens 0-2 are still the base exactly, the rest change
    gate = torch.tensor([[False, False, False, True, True, True]])
    with adapter_tokens(model, gate):
        got = model(input_ids=ids).logits
    assert torch.equal(got[:, :3], ref[:, :3])
    assert not torch.allclose(got[:, 3:], ref[:, 3:])
    assert adapter.gate is None  # restored after the block
    with adapter_tokens(model, torch.ones(1, 5, dtype=torch.bool)), pytest.raises(ValueError, match="does not match"):
        model(input_ids=ids)


def test_mask_row_only_where_gated_and_only_adapter_trains():
    base, model, adapter = adapted()
    emb_before = model.get_input_embeddings().weight.detach().clone()
    ids = torch.tensor([[5, MASK_ID, 9, MASK_ID]])
    # only the mask row changes the first layer's input; the LoRA pairs are zeroed to isolate it
    with torch.no_grad():
        for pair in adapter.lora.values():
            pair.lora_B.weight.zero_()
    gate = torch.tensor([[True, True, True, False]])
    with adapter_tokens(model, gate):
        hidden = model.get_input_embeddings()(ids)
    assert torch.equal(hidden[0, 1], adapter.mask_embedding[0])  # gated mask token: the adapter's row
    assert torch.equal(hidden[0, 3], emb_before[MASK_ID])  # ungated mask token: the base row
    assert torch.equal(hidden[0, 0], emb_before[5])
    randomize(adapter)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        with adapter_tokens(model, gate):
            loss = model(input_ids=ids).logits.square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    for key, value in base.state_dict().items():  # every base tensor, embedding rows included, bit-identical
        assert torch.equal(model.state_dict()[key], value), key


def test_peft_state_dict_round_trip_and_merge():
    base, model, adapter = adapted()
    state = {k: v.clone() for k, v in peft_state_dict(adapter).items()}
    assert "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight" in state
    assert state["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].shape == (32, 4)
    assert state[MASK_EMBEDDING_KEY].shape == (1, 32)
    other = attach_adapter(copy.deepcopy(base), MASK_ID, rank=4, alpha=8.0)
    load_peft_state_dict(other, state)
    for k, v in peft_state_dict(other).items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(ValueError, match="missing"):
        load_peft_state_dict(other, {k: v for k, v in state.items() if k != MASK_EMBEDDING_KEY})
    # merged = adapter on for every token
    ids = torch.tensor([[5, MASK_ID, 9, 11]])
    with torch.no_grad(), adapter_tokens(model, torch.ones(1, 4, dtype=torch.bool)):
        on = model(input_ids=ids).logits
    merged = copy.deepcopy(base)
    attach_adapter(merged, MASK_ID, rank=4, alpha=8.0)
    load_peft_state_dict(find_adapter(merged), state)
    merge_adapter(merged)
    assert find_adapter(merged) is None
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, on, rtol=1e-4, atol=1e-4)


def base_greedy(base, prompt, n):
    """Plain transformers generate() on the untouched base (the mask token banned, as our decoders do)."""
    out = base.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        bad_words_ids=[[MASK_ID]], eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_self_speculation_with_adapter_equals_base_generate(family, static):
    """Lossless: the verifier is the unchanged base, whatever the (random, untrained) drafter drafts."""
    base, model, _ = adapted(family)
    lm = StaticCachedLM(model, MASK_ID, capacity=512) if static else HFCachedLM(model, MASK_ID)
    plain = HFCachedLM(copy.deepcopy(base), MASK_ID)  # the same base without an adapter
    assert lm.has_adapter and not plain.has_adapter
    diffusion_differs = False
    for block in (4, 8):
        for prompt in random_prompts(300 + block, 2, min_len=3):
            n = 2 * block + 3
            ref = base_greedy(base, prompt, n)
            cfg = DecodeConfig(max_new_tokens=n, block_size=block)
            for mode in ("ar", "linear_spec", "quadratic_spec"):
                assert generate(lm, [prompt], mode, cfg)[0].tokens == ref, f"{mode} B={block} prompt {prompt}"
            with_adapter = generate(lm, [prompt], "diffusion", cfg)[0].tokens
            diffusion_differs |= with_adapter != generate(plain, [prompt], "diffusion", cfg)[0].tokens
    assert diffusion_differs, "the drafter adapter never changed a diffusion output: is it switched on?"


def test_quadratic_gate_is_masks_only():
    """Inside quadratic_spec's one forward: first tokens (verify) off, masks (drafts) on."""
    _, model, _ = adapted()
    lm = HFCachedLM(model, MASK_ID)
    seen = []
    forward = lm.forward

    def spy(cache, input_ids, position_ids, attention_mask, write_cache, adapter_gate=None):
        seen.append((input_ids.shape[1], write_cache, None if adapter_gate is None else adapter_gate.clone()))
        return forward(cache, input_ids, position_ids, attention_mask, write_cache, adapter_gate=adapter_gate)

    lm.forward = spy
    B = 4
    generate(lm, [[5, 6, 7]], "quadratic_spec", DecodeConfig(max_new_tokens=6, block_size=B))
    prefill, first_draft, cycles = seen[0], seen[1], seen[2:]
    assert prefill[2] is None
    assert first_draft[2] is not None and bool(first_draft[2].all())
    for q, write, gate in cycles:
        assert q == B * (B + 1) and write
        expect = (torch.arange(B + 1).repeat(B) != 0)[None]
        assert torch.equal(gate, expect)


@torch.no_grad()
def test_static_graph_gate_all_false_equals_no_gate():
    """The CUDA-graph path sends an all-False gate for base passes (one capture per shape serves both):
    on the CPU, such a pass gives the same logits as no gate, bit for bit."""
    _, model, _ = adapted()
    lm = StaticCachedLM(model, MASK_ID, capacity=64)
    ids = torch.tensor([[5, 6, 7, 8]])
    pos = torch.arange(4)[None]
    mask = torch.ones(4, 4, dtype=torch.bool).tril()[None]
    a = lm.forward(lm.new_cache(1), ids, pos, mask, write_cache=True)
    b = lm.forward(lm.new_cache(1), ids, pos, mask, write_cache=True, adapter_gate=torch.zeros(1, 4, dtype=torch.bool))
    assert torch.equal(a, b)


def test_two_stream_training_trains_only_the_drafter(tmp_path):
    """The trainer's optimizer and loss on a tiny DLM with adapter=lora: every base tensor is bit-identical
    after training, the diffusion loss falls, and the AR term (clean half, adapter off) does not move."""
    from nemodiff_train.config.load import compose
    from nemodiff_train.engines.torch.loss import TwoStreamLoss
    from nemodiff_train.engines.torch.state import make_optimizer, trained_module
    from nemodiff_train.models.hf import load_dlm
    from nemodiff_train.models.step import collate
    from tests.helpers.tiny_models import save_tiny_model

    save_tiny_model(tmp_path / "m", "qwen3", tie=False, initializer_range=0.3)
    dlm = load_dlm(tmp_path / "m", mask_token=MASK_ID, settings={"train_block_size": 4})
    before = {k: v.clone() for k, v in dlm.hf.state_dict().items()}
    dlm.add_adapter(rank=4, alpha=8.0)
    cfg = compose(["recipe=tiny_cpu", "adapter=lora", "optim.lr=3e-2", "stages.0.lr=3e-2", "optim.weight_decay=0"])
    optim = make_optimizer(dlm, cfg, cfg.stages[0])
    assert trained_module(dlm) is dlm.adapter
    assert sum(p.numel() for g in optim.param_groups for p in g["params"]) == dlm.adapter.trainable_parameters()
    loss_module = TwoStreamLoss(dlm, block_size=4, chunk_size=64)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(4, 96, (16,), generator=g).repeat(2)[:16], "doc_ids": torch.zeros(16),
             "loss_mask": torch.ones(16)} for _ in range(4)]  # periodic rows: learnable from context
    mb = collate(rows, list(range(4)), seed=0, mask_token_id=MASK_ID, schedule="uniform", eps=1e-3, block_size=4,
                 half_life_ratio=0.25)
    history = []
    for _ in range(30):
        parts = loss_module(mb)
        (parts.diffusion_sum + parts.ar_sum).backward()
        optim.step()
        optim.zero_grad()
        history.append(((parts.diffusion_sum / parts.diffusion_count).item(), (parts.ar_sum / parts.ar_count).item()))
    assert history[-1][0] < 0.7 * history[0][0], history
    assert all(ar == history[0][1] for _, ar in history), "the AR half must be the frozen base: its loss cannot move"
    after = dlm.hf.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_adapter_config_group():
    from nemodiff_train.config.errors import ConfigError
    from nemodiff_train.config.load import compose

    assert compose(["recipe=tiny_cpu"]).adapter.name == "none"
    cfg = compose(["recipe=tiny_cpu", "adapter=lora", "adapter.rank=8"])
    assert (cfg.adapter.name, cfg.adapter.rank, cfg.adapter.target_modules) == ("lora", 8, ["q_proj", "k_proj", "v_proj", "o_proj"])
    with pytest.raises(ConfigError, match="adapter.rnk"):
        compose(["recipe=tiny_cpu", "adapter=lora", "+adapter.rnk=8"])
    with pytest.raises(ConfigError, match="adapter.dropout"):
        compose(["recipe=tiny_cpu", "adapter=lora", "adapter.dropout=1.5"])
    with pytest.raises(ConfigError, match="adapter.name"):
        compose(["recipe=tiny_cpu", "adapter.name=qlora"])
    with pytest.raises(ConfigError, match="adapter.target_modules"):
        compose(["recipe=tiny_cpu", "adapter=lora", "adapter.target_modules=[]"])


def test_adapter_figures_formulas_count_what_attach_adapter_builds():
    """tools/adapter_figures.py estimates the 8B shape with formulas; they must count a real model exactly."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("adapter_figures", Path(__file__).parents[2] / "tools" / "adapter_figures.py")
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    model = tiny_model("qwen3", tie=False)
    shape = dict(layers=2, d=32, ffn=64, heads=4, kv_heads=2, head_dim=8, vocab=96, tied=False)
    assert figures.base_parameters(shape) == sum(p.numel() for p in model.parameters())
    adapter = attach_adapter(model, MASK_ID, rank=4, target_modules=("q_proj", "v_proj", "o_proj"))
    assert figures.adapter_parameters(shape, 4, ["q_proj", "v_proj", "o_proj"]) == adapter.trainable_parameters()
