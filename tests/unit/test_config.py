"""Every config file composes and validates; bad keys and values fail naming the key."""

from pathlib import Path

import pytest

from nemodiff_train.config import ConfigError, compose
from nemodiff_train.config.load import CONF_DIR, list_recipes, load_saved_config, save_config

pytestmark = pytest.mark.unit

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("recipe", "apps"))


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_recipe_composes_and_validates(recipe):
    cfg = compose([f"recipe={recipe}"])
    assert cfg.recipe == recipe
    assert cfg.total_steps > 0


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))])
def test_every_group_option_composes(group, option):
    overrides = ["recipe=tiny_cpu", f"{group}={option}"]
    cfg = compose(overrides)
    assert cfg is not None


def test_overrides_reach_the_typed_tree():
    cfg = compose(["recipe=demo_cpu", "diffusion.block_size=32", "optim.lr=1e-5", "stages.1.steps=7"])
    assert cfg.diffusion.block_size == 32 and cfg.optim.lr == 1e-5 and cfg.stages[1].steps == 7
    assert cfg.stages[0].data.kind == "pretrain" and cfg.stages[1].data.kind == "sft"


@pytest.mark.parametrize("overrides,key", [
    (["optim.lrr=1e-3"], "optim.lrr"),
    (["+optim.lrr=1e-3"], "lrr"),
    (["recipe=tiny_cpu", "diffusion.block_size=big"], "diffusion.block_size"),
    (["recipe=tiny_cpu", "diffusion.block_size=0"], "diffusion.block_size"),
    (["recipe=tiny_cpu", "diffusion.schedule=cosine"], "diffusion.schedule"),
    (["recipe=tiny_cpu", "diffusion.pattern=causal"], "diffusion.pattern"),
    (["recipe=tiny_cpu", "diffusion.full_block_fraction=1.5"], "diffusion.full_block_fraction"),
    (["recipe=tiny_cpu", "eval.commit_rule=leftmost"], "eval.commit_rule"),
    (["recipe=tiny_cpu", "eval.probe.commit_rule=any"], "eval.probe.commit_rule"),
    (["recipe=tiny_cpu", "eval.sweep.commit_rule=[confident,left]"], "eval.sweep.commit_rule"),
    (["recipe=tiny_cpu", "stages.0.global_batch_size=5"], "stages.0.global_batch_size"),
    (["recipe=tiny_cpu", "stages.0.kind=dpo"], "stages.0.kind"),
    (["recipe=tiny_cpu", "engine.tp=2"], "engine.tp"),
    (["recipe=tiny_cpu", "optim.min_lr=1.0"], "optim.min_lr"),
    (["recipe=no_such_recipe"], "no_such_recipe"),
    (["recipe=demo_cpu", "eval.limit=0"], "eval.limit"),
    (["recipe=demo_cpu", "eval.limit={code_completion: 0}"], "eval.limit"),
    (["recipe=tiny_cpu", "eval.limit={gsm8k: 5}"], r"eval.limit: names \['gsm8k'\]"),
    (["recipe=demo_cpu", "eval.limit={gsm8k: 5}"], "eval.limit"),  # Hydra: a key the recipe's mapping lacks
])
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose(overrides)


def test_eval_limit_per_task_reaches_the_typed_tree():
    cfg = compose(["recipe=demo_cpu", "eval.limit={arithmetic: 100, code_completion: 40}"])
    assert dict(cfg.eval.limit) == {"arithmetic": 100, "code_completion": 40}
    assert compose(["recipe=demo_cpu", "eval.limit=7"]).eval.limit == 7


def test_saved_config_round_trips(tmp_path: Path):
    cfg = compose(["recipe=demo_cpu", "run.seed=5"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_saved_config(tmp_path / "config.yaml") == cfg


def test_torch_engine_takes_context_parallelism():
    cfg = compose(["recipe=tiny_cpu", "engine.cp=2"])
    assert cfg.engine.name == "torch" and cfg.engine.cp == 2


@pytest.mark.parametrize("override,key", [
    ("model.attn_implementation=flex_attention", "model.attn_implementation"),
    ("diffusion.teacher_kl=0.1", "diffusion.teacher_kl"),
    ("diffusion.drafter_kl=0.1", "diffusion.drafter_kl"),
    ("diffusion.certainty=0.1", "diffusion.certainty"),
    ("stages.0.data.seq_len=34", "stages.0.data.seq_len"),  # not divisible by 2·cp = 4
    ("engine.pp=2", "engine.pp"),
])
def test_torch_context_parallelism_refuses_what_is_not_verified(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose(["recipe=tiny_cpu", "engine.cp=2", override])
