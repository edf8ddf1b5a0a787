"""Where the configs come from: one CONF_DIR for every CLI, and a user's own recipe directory."""

import pytest

import nemodiff_train.config.load as load
from nemodiff_train.config.errors import ConfigError
from nemodiff_train.config.load import compose

pytestmark = pytest.mark.unit


def test_every_cli_composes_from_the_one_conf_dir():
    from nemodiff_train.cli import bench, evaluate, export, train

    assert (load.CONF_DIR / "config.yaml").is_file() and load.APPS_CONF_DIR == load.CONF_DIR / "apps"
    for cli in (bench, evaluate, export, train):
        assert not hasattr(cli, "CONF_DIR") or cli.CONF_DIR is load.CONF_DIR, cli.__name__
    assert set(load.list_recipes()) >= {"tiny_cpu", "demo_cpu"}


def test_a_users_recipe_directory_is_added_to_the_search_path(tmp_path):
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "my_tiny.yaml").write_text(
        "# @package _global_\ndefaults:\n  - /recipe/tiny_cpu\nrecipe: my_tiny\noptim:\n  lr: 2.0e-4\n")
    cfg = compose([f"hydra.searchpath=[file://{tmp_path}]", "recipe=my_tiny"])
    assert cfg.recipe == "my_tiny" and cfg.optim.lr == 2.0e-4
    assert cfg.stages[0].steps == compose(["recipe=tiny_cpu"]).stages[0].steps  # the rest from tiny_cpu
    with pytest.raises(ConfigError, match="my_tiny"):
        compose(["recipe=my_tiny"])  # not on the search path without it


def test_an_install_without_configs_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(load, "CONF_DIR", tmp_path / "conf")
    with pytest.raises(ConfigError, match=r"conf/config\.yaml does not exist: this nemodiff_train install"):
        compose(["recipe=tiny_cpu"])
