"""``nemodiff-bench``: decoding speed per mode and batch size, HF ``generate`` baseline, speed of light.

Usage::

    nemodiff-bench model=embedded out=/tmp/bench prompt_len=32 max_new_tokens=32 runs=3   # CPU, the demo model
    nemodiff-bench shape=qwen3-8b batch_sizes=[1,8] out=/tmp/bench-8b                     # a GPU
    python -m nemodiff_train.cli.bench ...                                                # the same

Keys: ``conf/apps/bench.yaml`` (one per field of :class:`~nemodiff_train.bench.runner.BenchConfig`).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from ..bench.runner import BenchConfig, BenchError, run_bench
from ..config.load import APPS_CONF_DIR, merge_into
from ._console import setup_console

__all__ = ["main", "to_bench_config"]


def to_bench_config(cfg: DictConfig | dict) -> BenchConfig:
    """Merge the composed config into :class:`BenchConfig`; unknown keys and bad values name the key."""
    return merge_into(BenchConfig, cfg, app="nemodiff-bench", error=BenchError)


@hydra.main(config_path=str(APPS_CONF_DIR), config_name="bench", version_base=None)
def _app(cfg: DictConfig) -> None:
    from ..models.attention import UnsupportedModelError

    try:
        run_bench(to_bench_config(cfg))
    except (BenchError, UnsupportedModelError, FileNotFoundError) as e:
        print(f"nemodiff-bench: error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Console entry point (``nemodiff-bench``)."""
    setup_console()
    _app()


if __name__ == "__main__":
    main()
