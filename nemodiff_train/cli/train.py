"""``nemodiff-train recipe=<name> run.dir=<path> [key=value ...]`` — train (or resume) a run.

Runs as a plain process or under torchrun (``torchrun --nproc-per-node=2 -m nemodiff_train.cli.train ...``).
The engine is chosen by ``engine=torch|megatron``. Hydra composes the config; everything below this
file receives the validated dataclass tree.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ..config.load import CONF_DIR, ConfigError, register_schema, to_config

__all__ = ["main", "default_run_dir"]


def default_run_dir(recipe: str | None) -> Path:
    """``runs/<recipe>-<time>``; under torchrun the rendezvous id keeps every rank on the same dir."""
    stamp = os.environ.get("TORCHELASTIC_RUN_ID") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    if stamp in (None, "", "none"):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("run.dir must be given when running with several processes")
        stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{recipe or 'run'}-{stamp}"


def preflight(cfg) -> None:
    """Check what the config points at (model directory, local data files) before any work, naming the key.

    Hub names (``org/name``) are left to the download; ``embedded`` means the shipped assets.
    """
    from ..data.sources import SourceError, SourceSpec, resolve_files
    from ..engines.torch.setup import EMBEDDED, resolve_source

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
    preflight(cfg)
    run_dir = Path(cfg.run.dir) if cfg.run.dir else default_run_dir(cfg.recipe)
    if cfg.engine.name == "megatron":
        from ..engines.megatron.train import run as megatron_run

        return megatron_run(cfg)  # requires run.dir: every rank and every job of a chain share it
    from ..engines.torch.trainer import train

    return train(cfg, run_dir, validation_hooks=_validation_hooks(cfg))


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
    register_schema()
    _hydra_main()


if __name__ == "__main__":
    main()
