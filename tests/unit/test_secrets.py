"""Secrets: which keys are credentials (both directions), the W&B config, and recipes from someone else
(``_target_`` never instantiated, ``${oc.env:SECRET}`` refused, secret values scrubbed from what a
run saves)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from nemodiff_train.config.errors import ConfigError
from nemodiff_train.config.load import compose, load_saved_config, save_config, to_config
from nemodiff_train.config.secrets import is_secret_key, redact, scrub_env_values, secret_env_interpolations

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SECRET_KEYS = ["hf_token", "HF_TOKEN", "token", "wandb_api_key", "WANDB_API_KEY", "api_key", "openaiApiKey",
               "password", "db_password", "secret", "client_secret", "aws_secret_access_key", "use_auth_token",
               "access_token", "hub.token", "github_token", "credentials", "private_key"]
SETTING_KEYS = ["mask_token", "mask_token_id", "max_new_tokens", "pad_token", "eos_token_id", "stop_token_ids",
                "training_tokens", "tokens", "tokenizer", "tokens_per_forward", "num_tokens", "bos_token",
                "key", "text_key", "max_tokens", "token_budget", "masked_tokens", "keep_last"]


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_credential_keys_are_secret(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", SETTING_KEYS)
def test_settings_named_after_tokens_are_not_secret(key):
    assert not is_secret_key(key)


def test_wandb_config_keeps_settings_and_hides_credentials(monkeypatch):
    from nemodiff_train.engines.torch.metrics import redact as wandb_redact  # what MetricsSink hands wandb.init

    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop1234")
    cfg = {"model": {"mask_token": "<|mask|>", "mask_token_id": 151669, "hf_token": "hf_zzzzzzzzzzzz"},
           "eval": {"max_new_tokens": 256, "decoders": [{"mode": "ar", "api_key": "k-123456789"}]},
           "run": {"name": "leak hf_abcdefghijklmnop1234 here"}, "hub": {"password": "pw", "token": None}}
    out = wandb_redact(cfg)
    assert out["model"]["mask_token"] == "<|mask|>" and out["model"]["mask_token_id"] == 151669
    assert out["eval"]["max_new_tokens"] == 256 and out["eval"]["decoders"][0]["mode"] == "ar"
    assert out["model"]["hf_token"] == "***" and out["eval"]["decoders"][0]["api_key"] == "***"
    assert out["hub"]["password"] == "***" and out["hub"]["token"] is None  # nothing to hide
    assert out["run"]["name"] == "leak *** here"  # a secret env value under an innocent key


def test_wandb_offline_run_records_the_redacted_config(tmp_path, monkeypatch):
    """The real sink with W&B offline: its config record keeps mask_token_id / max_new_tokens and
    has no hf_token value."""
    pytest.importorskip("wandb")
    from nemodiff_train.config.schema import WandbConfig
    from nemodiff_train.engines.torch.metrics import MetricsSink, WandbRun
    from tests.integration.test_train_cli import _wandb_records
    from wandb.proto import wandb_internal_pb2

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    secret = "hf_wandbredactiontest0123456789"
    sink = MetricsSink(tmp_path, enabled=True, total_steps=1, start_step=0, progress_bar=False,
                       wandb=WandbRun(WandbConfig(project="nemodiff-test", mode="offline"),
                                      {"model": {"mask_token_id": 7, "hf_token": secret}, "eval": {"max_new_tokens": 64}}))
    sink.log({"step": 1, "loss": 1.0})
    sink.close()
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1 and secret.encode() not in files[0].read_bytes()
    def recorded_config() -> dict:
        config = {}
        for data in _wandb_records(files[0]):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(data)
            kind = rec.WhichOneof("record_type")
            if kind in ("run", "config"):  # the config given to wandb.init travels in the run record
                updates = rec.run.config.update if kind == "run" else rec.config.update
                config.update({i.key: json.loads(i.value_json) for i in updates})
        return config

    import time

    config = recorded_config()
    for _ in range(60):  # wandb's service process may still be writing the file on a loaded machine
        if "model" in config:
            break
        time.sleep(0.5)
        config = recorded_config()
    assert config["model"]["mask_token_id"] == 7 and config["eval"]["max_new_tokens"] == 64
    assert config["model"]["hf_token"] == "***"


# ---------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("where", ["top", "nested", "list"])
def test_a_target_in_a_recipe_is_refused_never_instantiated(where, tmp_path):
    marker = tmp_path / "ran"
    call = {"_target_": "os.system", "_args_": [f"touch {marker}"]}
    cfg = {"top": {"recipe": "x", **call}, "nested": {"model": {"path": "m", **call}},
           "list": {"stages": [{"name": "s", **call}]}}[where]
    with pytest.raises(ConfigError, match="_target_"):
        to_config(cfg)
    assert not marker.exists()


def test_the_package_never_instantiates_config_nodes():
    """No hydra.utils.instantiate / call / get_method anywhere: a _target_ is only ever a refused key."""
    bad = []
    for path in sorted((ROOT / "nemodiff_train").rglob("*.py")) + sorted((ROOT / "tools").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hydra"):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            if {"instantiate", "get_method", "get_class", "get_object"} & set(names):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, bad


@pytest.mark.parametrize("var", ["HF_TOKEN", "WANDB_API_KEY", "MY_PASSWORD", "AWS_SECRET_ACCESS_KEY"])
def test_oc_env_of_a_secret_variable_is_refused(var, monkeypatch):
    monkeypatch.setenv(var, "s3cr3t-value-123456")
    with pytest.raises(ConfigError, match=f"config key 'run.name' reads the secret environment variable '{var}'"):
        compose(["recipe=tiny_cpu", f"run.name=${{oc.env:{var}}}"])
    with pytest.raises(ConfigError, match="stages.0.data.sources.0"):
        to_config({"stages": [{"name": "s", "data": {"sources": [f"x${{oc.env:{var},fallback}}"]}}]})


def test_oc_env_of_an_ordinary_variable_still_works(monkeypatch, tmp_path):
    monkeypatch.setenv("NEMODIFF_RUN_NAME", "nightly")
    cfg = compose(["recipe=tiny_cpu", "run.name=${oc.env:NEMODIFF_RUN_NAME}"])
    assert cfg.run.name == "nightly"
    assert list(secret_env_interpolations({"a": "${oc.env:${x}}"})) == [("a", "${x")]  # computed name: refused


def test_a_secret_value_that_reached_the_config_is_not_saved(monkeypatch, tmp_path):
    """A secret under a variable whose name does not say so cannot be refused by name; if its value is
    also in a secret-named variable, config.yaml gets *** instead."""
    monkeypatch.setenv("HF_TOKEN", "hf_savedconfigSECRET987654")
    monkeypatch.setenv("INNOCENT", "hf_savedconfigSECRET987654")
    cfg = compose(["recipe=tiny_cpu", "run.name=${oc.env:INNOCENT}"])
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "hf_savedconfigSECRET987654" not in text and "name: '***'" in text
    assert load_saved_config(tmp_path / "config.yaml").run.name == "***"
    assert scrub_env_values({"k": ["a hf_savedconfigSECRET987654"]}) == {"k": ["a ***"]}
    assert redact({"hf_token": "x", "mask_token_id": 3}) == {"hf_token": "***", "mask_token_id": 3}
