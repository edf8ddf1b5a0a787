"""``to_container``: every shipped recipe (and the CPU recipes with engine=megatron) → ConfigContainer.

The Ministral-3 recipes are translated from HF configs with the published shapes (no weights, no
Hub access): the provider path through AutoBridge's Ministral-3 bridge is the real one.
"""

from __future__ import annotations

import re
import signal

import pytest

from nemodiff_train.config.errors import ConfigError
from nemodiff_train.config.load import compose, list_recipes

MINISTRAL3 = {  # the published Ministral-3 configs (their config.json on the Hub)
    "3b": dict(num_hidden_layers=26, hidden_size=3072, intermediate_size=9216, tie_word_embeddings=True, theta=1e6),
    "8b": dict(num_hidden_layers=34, hidden_size=4096, intermediate_size=14336, tie_word_embeddings=False, theta=1e6),
    "14b": dict(num_hidden_layers=40, hidden_size=5120, intermediate_size=16384, tie_word_embeddings=False, theta=1e9),
}


def ministral3_config(size: str):
    from transformers import Mistral3Config, PixtralVisionConfig
    from transformers.models.ministral3 import Ministral3Config

    s = dict(MINISTRAL3[size])
    theta = s.pop("theta")
    text = Ministral3Config(vocab_size=131072, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                            max_position_embeddings=262144, rms_norm_eps=1e-5,
                            rope_parameters={"rope_type": "yarn", "rope_theta": theta, "factor": 16.0,
                                             "original_max_position_embeddings": 16384, "beta_fast": 32.0,
                                             "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                                             "llama_4_scaling_beta": 0.1}, **s)
    return Mistral3Config(text_config=text.to_dict(), vision_config=PixtralVisionConfig().to_dict(),
                          architectures=["Mistral3ForConditionalGeneration"],
                          tie_word_embeddings=s["tie_word_embeddings"])


def qwen3_config():
    from tests.helpers.tiny_models import tiny_config

    return tiny_config("qwen3", tie=False, architectures=["Qwen3ForCausalLM"])


# the six reference recipes (Nemotron-Labs-Diffusion's sizes x stages); variants (nld_8b_sft_distill,
# nld_8b_longctx) are checked below on what they change
MEGATRON_RECIPES = [r for r in list_recipes() if re.fullmatch(r"nld_(3b|8b|14b)_(pretrain|sft)", r)]


def test_the_nld_recipes_are_shipped():
    assert sorted(MEGATRON_RECIPES) == sorted(f"nld_{s}_{k}" for s in ("3b", "8b", "14b") for k in ("pretrain", "sft"))
    variants = sorted(set(r for r in list_recipes() if r.startswith("nld_")) - set(MEGATRON_RECIPES))
    assert variants == ["nld_8b_longctx", "nld_8b_sft_distill"]


def test_the_longctx_variant_is_nld_8b_pretrain_at_32k_with_cp8(tmp_path):
    """nld_8b_longctx (docs/long_context.md): nld_8b_pretrain's model, objective and tensor parallelism on
    rows of L = 32,768 split over cp = 8 ranks (each holds 2L/8 = 8,192 positions, as a cp = 1 rank of
    nld_8b_pretrain does), the same clean tokens per step."""
    from nemodiff_train.engines.megatron.config import to_container

    base = compose(["recipe=nld_8b_pretrain", f"run.dir={tmp_path / 'a'}"])
    long = compose(["recipe=nld_8b_longctx", f"run.dir={tmp_path / 'b'}"])
    assert long.model == base.model and long.diffusion == base.diffusion and long.optim == base.optim
    assert (long.engine.tp, long.engine.pp, long.engine.cp) == (4, 1, 8)
    (stage,), (base_stage,) = long.stages, base.stages
    assert stage.data.seq_len == 32768 and stage.data.seq_len * 2 // long.engine.cp == 2 * base_stage.data.seq_len
    assert stage.global_batch_size * stage.data.seq_len == base_stage.global_batch_size * base_stage.data.seq_len
    c = to_container(long, hf_dir=None, hf_config=ministral3_config("8b"))
    m = c.model
    assert m.context_parallel_size == 8 and m.tensor_model_parallel_size == 4 and m.seq_length == 65536
    assert m.calculate_per_token_loss and m.sequence_parallel
    with pytest.raises(ConfigError, match="engine.cp"):  # 2L must split into 2·cp equal chunks
        to_container(compose(["recipe=nld_8b_longctx", f"run.dir={tmp_path / 'c'}", "stages.0.data.seq_len=32764"]),
                     hf_dir=None, hf_config=ministral3_config("8b"))


def test_the_distill_variant_is_nld_8b_sft_with_a_distill_stage(tmp_path):
    """nld_8b_sft_distill (docs/distill.md): the same model, engine and parallelism as nld_8b_sft; its stage
    trains on the untouched base's answers (kind distill, teacher base), which the Megatron engine reads
    as SFT rows once they are generated."""
    from nemodiff_train.engines.megatron.config import to_container

    sft = compose(["recipe=nld_8b_sft", f"run.dir={tmp_path / 'a'}"])
    distill = compose(["recipe=nld_8b_sft_distill", f"run.dir={tmp_path / 'b'}"])
    assert distill.engine == sft.engine and distill.model == sft.model and distill.diffusion == sft.diffusion
    (stage,) = distill.stages
    assert stage.kind == stage.data.kind == "distill" and stage.data.distill.teacher == "base"
    c = to_container(distill, hf_dir=None, hf_config=ministral3_config("8b"))
    assert c.model.tensor_model_parallel_size == 4 and c.model.seq_length == 2 * stage.data.seq_len


@pytest.mark.parametrize("recipe", MEGATRON_RECIPES)
def test_nld_recipe_translates(tmp_path, recipe):
    from nemodiff_train.engines.megatron.attention import TwoStreamCoreAttention
    from nemodiff_train.engines.megatron.config import to_container
    from nemodiff_train.engines.megatron.data import TwoStreamDatasetProvider

    cfg = compose([f"recipe={recipe}", f"run.dir={tmp_path}"])
    assert cfg.engine.name == "megatron"
    size = recipe.split("_")[1]
    c = to_container(cfg, hf_dir=None, hf_config=ministral3_config(size))
    stage = cfg.stages[0]
    m = c.model
    assert type(m).__name__ == "Ministral3ModelProvider"
    assert m.tensor_model_parallel_size == {"3b": 1, "8b": 4, "14b": 8}[size]
    assert m.pipeline_model_parallel_size == 1 and m.context_parallel_size == 1
    assert m.sequence_parallel == (m.tensor_model_parallel_size > 1)
    assert m.num_layers == MINISTRAL3[size]["num_hidden_layers"] and m.vocab_size == 131072
    assert m.seq_length == 2 * 4096  # the network runs on [x_t ; x_0]
    assert m.position_embedding_type == "none" and m.calculate_per_token_loss
    assert m.share_embeddings_and_output_weights is False  # untied head (3B base is tied)
    assert m.nemodiff["block_size"] == 64 and m.nemodiff["pattern"] == "two_stream"
    assert m.nemodiff["rope"]["llama4_beta"] == 0.1 and len(m.nemodiff["rope"]["inv_freq"]) == 64
    spec = m.transformer_layer_spec(m)
    assert spec.submodules.self_attention.submodules.core_attention is TwoStreamCoreAttention
    assert m.freeze_vision_model and m.freeze_vision_projection
    t = c.train
    assert (t.train_iters, t.global_batch_size, t.micro_batch_size) == (stage.steps, 512, 1)
    assert t.exit_signal_handler and t.exit_signal == signal.SIGTERM
    o = c.optimizer
    assert (o.optimizer, o.lr, o.min_lr, o.weight_decay, o.adam_beta1, o.adam_beta2, o.clip_grad) == \
        ("adam", 1e-5, 1e-6, 0.1, 0.9, 0.95, 1.0)
    assert o.decoupled_weight_decay and o.use_distributed_optimizer and c.ddp.use_distributed_optimizer
    assert o.bf16 and c.mixed_precision == "bf16_mixed"
    s = c.scheduler
    assert s.lr_decay_style == "WSD" and s.lr_wsd_decay_style == "linear"
    assert (s.lr_warmup_iters, s.lr_decay_iters, s.lr_wsd_decay_iters) == \
        (round(0.01 * stage.steps), stage.steps, round(0.2 * stage.steps))
    ck = c.checkpoint
    assert ck.save == ck.load == str(tmp_path / "checkpoints" / f"0_{stage.name}")
    assert ck.finetune is False and ck.load_optim and ck.save_interval == cfg.checkpoint.every
    assert ck.most_recent_k == cfg.checkpoint.keep_last and ck.ckpt_format == "torch_dist"
    d = c.dataset
    assert isinstance(d, TwoStreamDatasetProvider) and d.seq_length == 4096 and d.dataloader_type == "single"
    assert d.train_blend == [str(tmp_path / "megatron" / "data" / f"0_{stage.name}" / "train")]
    assert c.logger.log_interval == 10 and c.logger.wandb_project is None
    assert c.validation.eval_interval == 500 and c.validation.eval_iters == 8


def test_nld_recipes_compose_with_the_torch_engine_schema():
    """The recipes are ordinary configs of the one schema; only the model parallelism is engine-specific
    (the torch engine is data-parallel, so it needs engine.tp=1)."""
    for recipe in MEGATRON_RECIPES:
        cfg = compose([f"recipe={recipe}", "engine=torch", "engine.tp=1", "engine.sequence_parallel=false"])
        assert cfg.engine.name == "torch" and cfg.stages[0].data.seq_len == 4096 and cfg.diffusion.block_size == 64
        if "_3b_" not in recipe:
            with pytest.raises(ConfigError, match="engine.tp"):
                compose([f"recipe={recipe}", "engine=torch"])


def _compose_or_skip(overrides):
    try:
        compose([overrides[0]])
    except ConfigError as e:  # the recipe itself is broken for every engine: not this tier's business
        pytest.skip(f"{overrides[0]} does not compose even with its own engine: {e}")
    return compose(overrides)


@pytest.mark.parametrize("recipe", ["tiny_cpu", "demo_cpu"])
def test_cpu_recipes_translate_under_megatron(tmp_path, recipe):
    from nemodiff_train.engines.megatron.config import to_container

    # the end-of-run evaluation and the decode probe are torch-engine features (rejected under Megatron)
    cfg = _compose_or_skip([f"recipe={recipe}", "engine=megatron", f"run.dir={tmp_path}", "model.mask_token_id=5",
                            "eval.at_end=false", "eval.probe.samples=0"])
    n = len(cfg.stages)
    if n > 1:
        with pytest.raises(ConfigError, match="engine.stage_index"):
            to_container(cfg, hf_config=qwen3_config())
    for i, stage in enumerate(cfg.stages):
        c = to_container(cfg, hf_config=qwen3_config(), stage_index=i, hf_dir=tmp_path / "hf_init")
        assert c.train.train_iters == stage.steps
        assert c.model.seq_length == 2 * stage.data.seq_len
        assert c.optimizer.lr == stage.lr
        assert c.checkpoint.save == str(tmp_path / "checkpoints" / f"{i}_{stage.name}")
        previous = tmp_path / "checkpoints" / f"{i - 1}_{cfg.stages[i - 1].name}"
        expected = str(tmp_path / "hf_init") if i == 0 else str(previous)
        assert c.checkpoint.pretrained_checkpoint == expected
        assert c.dataset.sample_offset == sum(s.steps * s.global_batch_size for s in cfg.stages[:i])
        assert c.model.nemodiff["block_size"] == cfg.diffusion.block_size


def test_schedules_logging_and_cpu_mode(tmp_path):
    from nemodiff_train.engines.megatron.config import to_container

    base = ["recipe=tiny_cpu", "engine=megatron", f"run.dir={tmp_path}", "model.mask_token_id=5"]
    c = to_container(compose(base + ["schedule=cosine"]), hf_config=qwen3_config())
    assert c.scheduler.lr_decay_style == "cosine"
    c = to_container(compose(base + ["schedule.name=constant"]), hf_config=qwen3_config())
    assert c.scheduler.lr_decay_style == "constant"
    c = to_container(compose(base + ["logging.wandb.project=nld", "logging.wandb.entity=team",
                                     "logging.wandb.name=x"]), hf_config=qwen3_config())
    assert (c.logger.wandb_project, c.logger.wandb_entity, c.logger.wandb_exp_name) == ("nld", "team", "x")
    assert c.logger.wandb_save_dir == str(tmp_path / "wandb")
    c = to_container(compose(base + ["engine.recompute=full", "checkpoint.resume=false"]), hf_config=qwen3_config(),
                     cpu=True)
    assert c.model.recompute_granularity == "full" and c.checkpoint.load is None
    assert c.dist.distributed_backend == "gloo" and c.mixed_precision is None
    assert not c.optimizer.use_distributed_optimizer


@pytest.mark.parametrize("override, match", [
    ("engine.cp=3", "engine.cp"),  # seq_len 32 is not a multiple of 3
    ("engine.megatron_attention=xformers", "engine.megatron_attention"),
    ("engine.stage_index=3", "engine.stage_index"),
])
def test_impossible_settings_name_the_key(tmp_path, override, match):
    from nemodiff_train.engines.megatron.config import to_container

    with pytest.raises(ConfigError, match=match):  # at composition or at translation, naming the key
        cfg = compose(["recipe=tiny_cpu", "engine=megatron", f"run.dir={tmp_path}", "model.mask_token_id=5", override])
        to_container(cfg, hf_config=qwen3_config())


def test_unknown_keys_are_errors():
    with pytest.raises(ConfigError, match="megatron_tp"):
        compose(["recipe=tiny_cpu", "engine=megatron", "engine.megatron_tp=2"])


def test_run_dir_is_required():
    from nemodiff_train.engines.megatron.config import to_container

    cfg = compose(["recipe=tiny_cpu", "engine=megatron", "model.mask_token_id=5"])
    with pytest.raises(ConfigError, match="run.dir"):
        to_container(cfg, hf_config=qwen3_config())
