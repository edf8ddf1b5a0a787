"""``nemodiff-train recipe=<name> run.dir=<path> [key=value ...]`` — train (or resume) a run.

Runs as a plain process or under torchrun (``torchrun --nproc-per-node=2 -m nemodiff_train.cli.train ...``).
The engine is chosen by ``engine=torch|megatron``; :mod:`nemodiff_train.orchestrate` trains with it,
then exports and evaluates. Hydra composes the config; everything below this file receives the
validated dataclass tree.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from .. import runs
from ..config.errors import ConfigError
from ..config.load import CONF_DIR, register_schema, to_config
from ._console import quiet_libraries

__all__ = ["main", "default_run_dir"]


def default_run_dir(recipe: str | None) -> Path:
    """``runs/<recipe>-<time>``; under torchrun the rendezvous id keeps every rank on the same dir."""
    stamp = os.environ.get("TORCHELASTIC_RUN_ID") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    if stamp in (None, "", "none"):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("run.dir must be given when running with several processes")
        stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{recipe or 'run'}-{stamp}"


def check_model(cfg) -> None:
    """Refuse, before anything is written, a model the run cannot use: a missing directory, a directory
    without ``config.json``, an unsupported architecture or attention implementation (ConfigError naming
    ``model.path`` and the directory). Hub ids that are not local directories are left to the engine."""
    from ..models.attention import UnsupportedModelError

    path = cfg.model.path
    if path == "embedded":
        from ..assets import embedded_model_dir

        local = embedded_model_dir()
    else:
        local = Path(path).expanduser()
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not local.is_dir():
        if looks_like_hub_id:
            return
        raise ConfigError(f"model.path={path!r}: {local} is not a directory")
    if not (local / "config.json").is_file():
        raise ConfigError(f"model.path={path!r}: {local} is not a Hugging Face model directory (no config.json)")
    from transformers import AutoConfig

    from ..models.arch import check_config, pick_attn_implementation

    try:
        config = AutoConfig.from_pretrained(local)
    except Exception as e:  # unknown model_type, malformed JSON: transformers' own message, one line
        raise ConfigError(f"model.path={path!r}: {local / 'config.json'} cannot be loaded: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    try:
        check_config(config)
    except UnsupportedModelError as e:
        raise ConfigError(f"model.path={path!r} ({local}): unsupported model: {e}") from None
    if cfg.model.attn_implementation is not None:
        try:
            pick_attn_implementation(config, "cpu", cfg.model.attn_implementation)
        except UnsupportedModelError as e:
            raise ConfigError(f"model.attn_implementation: {e}") from None


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def preflight(cfg) -> None:
    """Check what the config points at (model directory, local data files) before any work, naming the key.

    Hub names (``org/name``) are left to the download; ``embedded`` means the shipped assets.
    """
    from ..data.readers import SourceError
    from ..data.sources import SourceSpec, resolve_files
    from ..assets.resolve import EMBEDDED, resolve_data_source as resolve_source

    path = cfg.model.path
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") != 1
    if path != EMBEDDED and looks_local and not Path(path).expanduser().is_dir():
        raise ConfigError(f"model.path: {path!r} is not a directory (a local model directory, an org/name Hub id, "
                          f"or {EMBEDDED!r})")
    for i, stage in enumerate(cfg.stages):
        d = stage.data
        if d.prepared_dir and (Path(d.prepared_dir) / "meta.json").is_file():
            continue  # already prepared: the raw sources are not read again
        for field_name in ("sources", "val_sources"):
            for j, text in enumerate(getattr(d, field_name)):
                key = f"stages.{i}.data.{field_name}.{j}"
                try:
                    resolve_files(SourceSpec.parse(resolve_source(str(text)), text_field=d.text_field,
                                                   messages_field=d.messages_field))
                except (SourceError, ValueError, KeyError, FileNotFoundError) as e:
                    raise ConfigError(f"{key}: {e}") from None


def run(cfg_dict: DictConfig) -> Path:
    cfg = to_config(cfg_dict)
    check_model(cfg)
    preflight(cfg)
    run_dir = Path(cfg.run.dir) if cfg.run.dir else default_run_dir(cfg.recipe)
    from ..models.attention import UnsupportedModelError
    from ..engines import TrainOptions
    from ..orchestrate import train

    if cfg.engine.name == "megatron":
        return train(cfg, run_dir)  # run.dir is required: every rank and every job of a chain share it
    hooks = _validation_hooks(cfg)
    new_dir = not run_dir.exists()
    try:
        return train(cfg, run_dir, TrainOptions(validation_hooks=hooks))
    except (OSError, UnsupportedModelError) as e:  # OSError: missing/unreadable weights (FileNotFoundError too)
        # before the model loads, the run directory holds only config.yaml (hf_base/ follows the load)
        never_started = run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {runs.CONFIG_FILE}
        if not never_started:
            raise
        if new_dir and _is_rank0():
            shutil.rmtree(run_dir, ignore_errors=True)  # a run that never started leaves nothing behind
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not message.startswith("model.path="):
            message = f"model.path={cfg.model.path!r}: {message}"
        raise ConfigError(message) from None


def _validation_hooks(cfg) -> list:
    """The decode probe (TPF during training) when ``eval.probe.samples > 0``."""
    probe = cfg.eval.probe
    if probe.samples <= 0:
        return []
    if cfg.engine.distributed == "fsdp2" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("eval.probe.samples > 0 decodes on one rank with the full model, which FSDP2 shards; "
                          "use engine.distributed=ddp or set eval.probe.samples=0")
    from ..eval.training_probe import DecodeProbe

    try:
        return [DecodeProbe(probe)]
    except ValueError as e:
        raise ConfigError(str(e)) from None


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as e:
        print(f"nemodiff-train: configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:  # a torn/corrupt checkpoint or a full disk: the message names the files
        if type(e).__name__ != "CheckpointError":
            raise
        print(f"nemodiff-train: checkpoint error: {e}", file=sys.stderr)
        sys.exit(3)


def main() -> None:
    # Training prints its own progress per stage (engines/torch/metrics.py); the libraries' bars
    # for loading and saving the model would only interleave with it.
    quiet_libraries(progress_bars=False)
    register_schema()
    _hydra_main()


if __name__ == "__main__":
    main()
