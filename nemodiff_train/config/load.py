"""Hydra composition → validated :class:`~nemodiff_train.config.schema.Config`.

The ``conf/`` directory holds the config groups; ``conf/recipe`` points at the top-level
``recipes/`` folder so that ``recipe=<name>`` selects a named experiment (a ``@package _global_``
file that overrides any group). Every error names the key it is about.

Where ``conf/`` is (:data:`CONF_DIR`, the one definition every CLI uses): an installed wheel carries a
copy as ``nemodiff_train/_configs/conf`` (``setup.py`` copies ``conf/`` and ``recipes/`` there at build
time); a clone or an editable install reads the top-level ``conf/`` and ``recipes/`` directly, so
edits there take effect without reinstalling. A user's own configs are added with Hydra's
``--config-dir <dir>`` (CLIs) or ``hydra.searchpath=[file://<dir>]`` (also :func:`compose`):
``<dir>/recipe/<name>.yaml`` is then ``recipe=<name>``.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from .errors import ConfigError
from .schema import Config
from .validate import validate

__all__ = ["CONF_DIR", "APPS_CONF_DIR", "RECIPES_DIR", "to_config", "merge_into", "compose", "save_config",
           "load_saved_config", "list_recipes", "register_schema", "as_dict"]


def _config_dirs() -> tuple[Path, Path]:
    """``(conf dir, recipes dir)``: the wheel's packaged copy when there is one, else the clone's folders."""
    packaged = Path(str(resources.files("nemodiff_train"))) / "_configs" / "conf"
    if (packaged / "config.yaml").is_file():
        return packaged, packaged / "recipe"  # the build copies recipes/ into conf/recipe (no symlink)
    clone = Path(__file__).resolve().parents[2]
    return clone / "conf", clone / "recipes"


CONF_DIR, RECIPES_DIR = _config_dirs()
# conf/apps/ holds the group-free configs of the single-purpose CLIs (nemodiff-eval, -export, -bench): in
# conf/ itself, `model=<dir>` or `checkpoint=<dir>` would be read as a choice of a training config group.
APPS_CONF_DIR = CONF_DIR / "apps"


def to_config(cfg: DictConfig | dict) -> Config:
    """Merge a composed config into the typed schema; unknown keys and wrong types raise ConfigError."""
    raw = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    raw = OmegaConf.masked_copy(raw, [k for k in raw.keys() if k != "hydra"]) if "hydra" in raw else raw
    _reject_unknown_keys(OmegaConf.to_container(raw, resolve=False), Config, "")
    _refuse_secret_env(OmegaConf.to_container(raw, resolve=False))
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, raw)
        result = OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        raise ConfigError(f"unknown config key {_key_of(e)!r} (check its spelling): {e.msg}") from None
    except OmegaConfBaseException as e:
        key, msg = _find_bad_key(Config, OmegaConf.to_container(raw, resolve=False), "") or (_key_of(e), e.msg)
        raise ConfigError(f"invalid value for config key {key!r}: {msg}") from None
    validate(result)
    return result


def _refuse_secret_env(node: Any) -> None:
    """A recipe may not pull a secret from the environment: it would be saved in config.yaml, the W&B
    config and the export's nemodiff record (:mod:`.secrets`)."""
    from .secrets import secret_env_interpolations

    for key, var in secret_env_interpolations(node):
        raise ConfigError(f"config key {key!r} reads the secret environment variable {var!r} (${{oc.env:{var}}}): "
                          "secrets never go into a config, which is saved with the run; the tools that need "
                          "them (huggingface_hub, wandb) read HF_TOKEN / WANDB_API_KEY from the environment")


def _find_bad_key(schema: type, node: Any, prefix: str) -> tuple[str, str] | None:
    """The full dotted key (list items included: ``stages.0.micro_batch_size``) whose value does not
    fit ``schema``, and OmegaConf's message; OmegaConf's own errors lose the prefix inside lists."""
    import typing

    if not isinstance(node, dict):
        return None
    hints = typing.get_type_hints(schema)
    for key, value in node.items():
        sub = hints.get(key)
        item = typing.get_args(sub)[0] if typing.get_origin(sub) is list and typing.get_args(sub) else None
        if is_dataclass(sub) and isinstance(value, dict):
            found = _find_bad_key(sub, value, f"{prefix}{key}.")
        elif item is not None and is_dataclass(item) and isinstance(value, list):
            found = next((f for i, v in enumerate(value) if (f := _find_bad_key(item, v, f"{prefix}{key}.{i}."))), None)
        else:
            try:
                OmegaConf.merge(OmegaConf.structured(schema), {key: value})
                found = None
            except OmegaConfBaseException as e:
                found = (prefix + str(key), e.msg.splitlines()[0] if e.msg else type(e).__name__)
        if found:
            return found
    return None


def merge_into(schema: type, cfg: DictConfig | dict, *, app: str, error: type[Exception]):
    """Merge a composed config into a flat dataclass ``schema`` (the eval/export CLIs' configs).

    Unknown keys, missing mandatory values and bad values raise ``error`` naming the key and ``app``.
    """
    raw = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    if "hydra" in raw:
        raw = OmegaConf.masked_copy(raw, [k for k in raw.keys() if k != "hydra"])
    valid = ", ".join(f.name for f in fields(schema))
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), raw))
    except ConfigKeyError as e:
        raise error(f"unknown {app} key {e.full_key!r} (check its spelling; valid keys: {valid})") from None
    except MissingMandatoryValue as e:
        raise error(f"{app} needs {e.full_key}=<...>") from None
    except OmegaConfBaseException as e:
        raise error(f"invalid value for {app} key {e.full_key!r}: {e.msg.splitlines()[0]}") from None


def _reject_unknown_keys(node: Any, schema: type, prefix: str) -> None:
    """Walk the composed tree against the dataclasses: Hydra's ``+key=`` appends even to typed nodes."""
    import typing

    if not isinstance(node, dict):
        return
    hints = typing.get_type_hints(schema)
    for key, value in node.items():
        if key not in hints:
            raise ConfigError(f"unknown config key {prefix + str(key)!r} (check its spelling); "
                              f"known keys here: {sorted(hints)}")
        sub = hints[key]
        origin = typing.get_origin(sub)
        if is_dataclass(sub):
            _reject_unknown_keys(value, sub, f"{prefix}{key}.")
        elif origin is list and isinstance(value, list):
            (item_type,) = typing.get_args(sub) or (None,)
            if item_type is not None and is_dataclass(item_type):
                for i, item in enumerate(value):
                    _reject_unknown_keys(item, item_type, f"{prefix}{key}.{i}.")


def _key_of(e: OmegaConfBaseException) -> str:
    return str(getattr(e, "full_key", None) or getattr(e, "key", None) or "?")


def register_schema() -> None:
    """Store the dataclass schema as Hydra's base config ``schema`` (conf/config.yaml extends it), so
    every key exists with its type and a misspelt override fails at composition naming the key."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=Config)


def compose(overrides: list[str] | None = None) -> Config:
    """Compose ``conf/config.yaml`` with overrides (e.g. ``["recipe=demo_cpu", "optim.lr=1e-4"]``;
    ``"hydra.searchpath=[file:///my/configs]"`` adds a directory of your own groups and recipes)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException

    register_schema()
    if not (CONF_DIR / "config.yaml").is_file():
        raise ConfigError(f"{CONF_DIR / 'config.yaml'} does not exist: this nemodiff_train install carries no "
                          "configs (install a wheel or `pip install .`, or run from a clone)")
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(str(e)) from None
    return to_config(cfg)


def save_config(cfg: Config, path: Path) -> None:
    from .secrets import scrub_env_values

    tree = scrub_env_values(OmegaConf.to_container(OmegaConf.structured(cfg)))  # no secret env value
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(tree)))


def load_saved_config(path: Path) -> Config:
    """Read a run directory's resolved ``config.yaml`` back (validated)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no saved config")
    return to_config(OmegaConf.load(path))


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def as_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists (for JSON)."""
    if is_dataclass(obj):
        return {f.name: as_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, list):
        return [as_dict(x) for x in obj]
    return obj
