"""DecodeConfig validation, result bookkeeping, mode dispatch and the batch-1 errors of the spec modes."""

import pytest

from nemodiff_train.decoding import MODES, DecodeConfig, DecodeResult, DecodeStats, generate
from nemodiff_train.decoding.linear_spec import linear_spec_generate
from nemodiff_train.decoding.quadratic_spec import quadratic_spec_generate
from tests.helpers.decoding import one_thread, tiny_lm  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("field,value", [
    ("max_new_tokens", 0), ("max_new_tokens", 1.5), ("block_size", 0), ("threshold", 1.5), ("threshold", -0.1),
    ("steps_per_block", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.1), ("eos_token_ids", (-1,)),
    ("seed", "x"),
])
def test_invalid_field_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DecodeConfig(**{field: value})


def test_steps_per_block_needs_fixed_steps_variant():
    with pytest.raises(ValueError, match="steps_per_block"):
        DecodeConfig(threshold=0.9, steps_per_block=4)
    assert DecodeConfig(threshold=None, steps_per_block=4).steps_per_block == 4


def test_defaults_and_list_eos_become_tuple():
    cfg = DecodeConfig(eos_token_ids=[2, 5])
    assert cfg.eos_token_ids == (2, 5)
    assert (cfg.max_new_tokens, cfg.block_size, cfg.threshold, cfg.temperature, cfg.top_p) == (128, 32, 0.9, 0.0, 1.0)


def test_stats_tpf_and_to_dict_excludes_cache():
    stats = DecodeStats(generated_tokens=6, prefill_forwards=1, forwards=4, committed_per_forward=[0, 3, 0, 2],
                        drafted=6, accepted=3, finished_by="eos")
    assert stats.tpf == 1.5 and stats.acceptance_rate == 0.5
    d = DecodeResult([1, 2, 3, 4, 5, 6], stats, cache=[("k", "v")]).to_dict()
    assert "cache" not in d and d["tpf"] == 1.5 and d["finished_by"] == "eos"


@pytest.mark.parametrize("decoder", [linear_spec_generate, quadratic_spec_generate])
def test_spec_modes_reject_empty_batches_and_prompts(decoder):
    with pytest.raises(ValueError, match="no prompts"):
        decoder(tiny_lm(), [], DecodeConfig(max_new_tokens=4, block_size=4))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        decoder(tiny_lm(), [[5, 6], []], DecodeConfig(max_new_tokens=4, block_size=4))


def test_spec_modes_need_two_token_blocks():
    with pytest.raises(ValueError, match="block_size"):
        linear_spec_generate(tiny_lm(), [[5, 6]], DecodeConfig(max_new_tokens=4, block_size=1))


def test_generate_dispatch_batches_every_mode_and_rejects_unknown():
    lm, prompts = tiny_lm(tie=False), [[5, 6, 7], [9], [10, 11]]
    cfg = DecodeConfig(max_new_tokens=5, block_size=4)
    for mode in MODES:
        res = generate(lm, prompts, mode, cfg)
        assert len(res) == 3 and all(len(r.tokens) == 5 for r in res)
    with pytest.raises(ValueError, match="unknown decoding mode"):
        generate(lm, prompts, "beam", cfg)


def test_empty_prompt_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        generate(tiny_lm(), [[]], "ar", DecodeConfig(max_new_tokens=2))
