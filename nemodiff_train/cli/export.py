"""``nemodiff-export``: a trained DLM → Hugging Face directory (+ remote code, model card) → Hub.

Usage::

    nemodiff-export checkpoint=runs/tiny out=runs/tiny/hf               # run dir: latest complete checkpoint
    nemodiff-export checkpoint=runs/tiny/checkpoints/step_00000006 out=/tmp/hf dtype=bfloat16 remote_code=true
    nemodiff-export checkpoint=runs/tiny out=/tmp/hf push_to_hub=me/tiny-dlm dry_run=true
    nemodiff-export out=/tmp/hf push_to_hub=me/tiny-dlm private=false    # push an existing export
    python -m nemodiff_train.cli.export ...                                # the same

Keys: ``conf/apps/export.yaml`` (one per field of :class:`ExportCLIConfig`). Errors (bad checkpoint,
non-empty ``out``, unknown key) print one line naming the file or key and exit with status 1 (2 for
a bad key); nothing is written then. The Hub token comes from ``HF_TOKEN`` and is never printed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hydra
from omegaconf import DictConfig

from ..config.load import APPS_CONF_DIR, merge_into
from ._console import setup_console

from ..export import ExportError, push_to_hub
from ..orchestrate import export_any

__all__ = ["ExportCLIConfig", "ExportCLIError", "to_cli_config", "run", "main"]


@dataclass
class ExportCLIConfig:
    """``nemodiff-export`` settings (see ``conf/apps/export.yaml``)."""

    out: str
    checkpoint: Optional[str] = None
    dtype: str = "float32"
    remote_code: bool = False
    merge: bool = False
    push_to_hub: Optional[str] = None
    private: bool = True
    dry_run: bool = False
    overwrite: bool = False
    max_shard_size: str = "5GB"
    eval_json: Optional[str] = None

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ExportCLIError(f"dtype: {self.dtype!r} is not one of ['float32', 'bfloat16']")
        if self.checkpoint is None and self.push_to_hub is None:
            raise ExportCLIError("checkpoint: nemodiff-export needs checkpoint=<run dir | checkpoint dir | HF dir> "
                                 "(or push_to_hub=<owner/name> to push an existing export in out)")


class ExportCLIError(ValueError):
    """A bad ``nemodiff-export`` setting; the message names the key."""


def to_cli_config(cfg: DictConfig | dict) -> ExportCLIConfig:
    """Merge the composed config into :class:`ExportCLIConfig`; unknown keys and bad values name the key."""
    return merge_into(ExportCLIConfig, cfg, app="nemodiff-export", error=ExportCLIError)


def run(c: ExportCLIConfig) -> Path:
    """Export (when ``checkpoint`` is set), then push (when ``push_to_hub`` is set); returns ``out``."""
    out = Path(c.out)
    if c.checkpoint is not None:
        export_any(c.checkpoint, out, dtype=c.dtype, remote_code=c.remote_code, overwrite=c.overwrite,
                          eval_json=c.eval_json, max_shard_size=c.max_shard_size, merge=c.merge)
        print(f"exported {c.checkpoint} -> {out}")
    if c.push_to_hub:
        push_to_hub(out, c.push_to_hub, private=c.private, dry_run=c.dry_run)
    elif c.dry_run:
        print("dry_run=true has no effect without push_to_hub=<owner/name>")
    return out


@hydra.main(config_path=str(APPS_CONF_DIR), config_name="export", version_base=None)
def _app(cfg: DictConfig) -> None:
    try:
        c = to_cli_config(cfg)
    except ExportCLIError as e:
        print(f"nemodiff-export: error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        run(c)
    except ExportError as e:
        print(f"nemodiff-export: error: {e}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    """Console entry point (``nemodiff-export``)."""
    setup_console()
    _app()


if __name__ == "__main__":
    main()
