"""``build_job``: the Megatron job up to ``pretrain``, built in the test process on CPU (no process group,
no model, no CUDA emulation needed), with ``engine.init_from=hf`` and ``random``.

What ``launch`` then does with each is run by the CPU tier in subprocesses:
tests/megatron/test_megatron_cpu_pretrain.py (hf: the first loss equals the torch engine's) and
tests/megatron/test_megatron_engine_check_cpu.py (random: a config-only model directory trains).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from nemodiff_train.config.errors import ConfigError
from nemodiff_train.config.load import compose
from tests.helpers.tiny_models import save_tiny_model
from tests.helpers.tiny_tokenizer import make_tiny_tokenizer


def _base(tmp_path):
    model_dir = tmp_path / "base"
    tok = make_tiny_tokenizer(model_dir)  # no mask token: the hf path must add one
    save_tiny_model(model_dir, "qwen3", vocab_size=len(tok), tie=True)
    return model_dir, len(tok)


def _cfg(run_dir, model_dir, *extra):
    return compose(["recipe=tiny_cpu", "engine=megatron", "engine.device=cpu", f"run.dir={run_dir}",
                    f"model.path={model_dir}", *extra])


def test_init_from_hf_prepares_the_weights_and_loads_them(tmp_path):
    from nemodiff_train.engines.megatron.train import build_job

    model_dir, vocab = _base(tmp_path)
    run_dir = tmp_path / "run"
    job = build_job(_cfg(run_dir, model_dir))
    assert job.hf_dir == run_dir / "megatron" / "hf_init" and (job.hf_dir / "NEMODIFF_INIT_DONE").is_file()
    assert json.loads((job.hf_dir / "config.json").read_text())["vocab_size"] == vocab + 1  # mask token added
    c = job.container
    assert c.checkpoint.pretrained_checkpoint == str(job.hf_dir)  # stage 0 loads the HF weights
    assert c.checkpoint.save == str(run_dir / "checkpoints" / "0_pretrain")
    m = c.model  # the provider, with its final values
    assert m.share_embeddings_and_output_weights is False and m.position_embedding_type == "none"
    assert m.seq_length == 2 * 32 and m.calculate_per_token_loss and m.vocab_size == vocab + 1
    assert (m.bf16, m.params_dtype, c.mixed_precision, c.dist.distributed_backend) == \
        (False, torch.float32, None, "gloo")
    assert job.forward_step.noise_kw["mask_token_id"] == vocab  # the added token's id
    assert type(job.callbacks[0]).__name__ == "_Writer"  # metrics.jsonl first
    assert (run_dir / "config.yaml").is_file()
    assert all(p.startswith(str(run_dir / "megatron" / "data")) for p in c.dataset.train_blend)
    assert job.finished_iteration is None and not job.done and job.stage_index == 0


def test_init_from_random_needs_no_weights(tmp_path):
    from nemodiff_train.engines.megatron.train import build_job

    model_dir, vocab = _base(tmp_path)
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    for f in model_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy2(f, config_only / f.name)
    run_dir = tmp_path / "run"
    job = build_job(_cfg(run_dir, config_only, "engine.init_from=random", "model.mask_token_id=5"))
    assert job.hf_dir == config_only and not (run_dir / "megatron" / "hf_init").exists()  # nothing converted
    assert job.container.checkpoint.pretrained_checkpoint is None and job.container.model.perform_initialization
    assert job.container.model.share_embeddings_and_output_weights is False  # untied by the provider, not the weights
    assert job.container.model.vocab_size == vocab and job.forward_step.noise_kw["mask_token_id"] == 5


def test_init_from_random_refuses_what_needs_weights(tmp_path):
    from nemodiff_train.engines.megatron.train import build_job

    model_dir, vocab = _base(tmp_path)
    with pytest.raises(ConfigError, match="engine.init_from=random.*add the mask token"):
        build_job(_cfg(tmp_path / "run", model_dir, "engine.init_from=random"))
    with pytest.raises(ConfigError, match="mask_token_id 99999 is outside the vocabulary"):
        build_job(_cfg(tmp_path / "run", model_dir, "engine.init_from=random", "model.mask_token_id=99999"))


@pytest.mark.parametrize("value, match", [("scratch", r"engine.init_from: 'scratch' is not one of \['hf', 'random'\]"),
                                          (None, "engine.init_from: random initialisation is a Megatron-engine")])
def test_bad_init_from_names_the_key(value, match):
    with pytest.raises(ConfigError, match=match):
        if value is None:  # the torch engine has no random initialisation
            compose(["recipe=tiny_cpu", "engine.init_from=random"])
        else:
            compose(["recipe=tiny_cpu", "engine=megatron", f"engine.init_from={value}"])
