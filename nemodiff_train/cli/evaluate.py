"""``nemodiff-eval``: evaluate a DLM in every decoding mode (TPF, tokens/s, accuracy, lossless).

Usage (the embedded model on a CPU, a few samples)::

    nemodiff-eval model=<hf dir or run dir> modes=[ar,diffusion,linear_spec,quadratic_spec] \\
        task=code_completion out=/tmp/eval limit=8
    python -m nemodiff_train.cli.evaluate model=... out=...   # the same

Keys: ``conf/apps/evaluate.yaml`` (one per field of :class:`~nemodiff_train.eval.runner.EvalConfig`).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from ..config.load import APPS_CONF_DIR, merge_into
from ._console import setup_console

from ..eval.runner import EvalConfig, run_evaluation

__all__ = ["main", "to_eval_config"]


class EvalConfigError(ValueError):
    """A bad ``nemodiff-eval`` setting; the message names the key."""


def to_eval_config(cfg: DictConfig | dict) -> EvalConfig:
    """Merge the composed config into :class:`EvalConfig`; unknown keys and bad values name the key."""
    return merge_into(EvalConfig, cfg, app="nemodiff-eval", error=EvalConfigError)


@hydra.main(config_path=str(APPS_CONF_DIR), config_name="evaluate", version_base=None)
def _app(cfg: DictConfig) -> None:
    try:
        eval_cfg = to_eval_config(cfg)
    except (EvalConfigError, ValueError) as e:  # ValueError: EvalConfig.__post_init__ checks
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from ..models.loading import resolve_model_dir
    from ..models.attention import UnsupportedModelError

    try:  # user errors about `model` (missing directory, unsupported architecture): one line, no traceback
        resolve_model_dir(eval_cfg.model)
        run_evaluation(eval_cfg)
    except UnsupportedModelError as e:
        print(f"nemodiff-eval: error: model={eval_cfg.model!r}: unsupported model: {e}", file=sys.stderr)
        sys.exit(2)
    except FileNotFoundError as e:
        if not str(e).startswith(str(eval_cfg.model)):
            raise
        print(f"nemodiff-eval: error: model={eval_cfg.model!r}: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Console entry point (``nemodiff-eval``)."""
    setup_console()
    _app()


if __name__ == "__main__":
    main()
