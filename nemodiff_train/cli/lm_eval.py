"""``nemodiff-lm-eval``: lm-eval's own command line with the ``nemodiff`` model and our tasks registered.

lm-eval 0.4.x finds models only in its built-in table or among classes registered by modules that
were imported before the run; it does not read the ``lm_eval`` entry-point group. This wrapper
imports :mod:`nemodiff_train.eval.lm_eval_plugin`, adds ``--include_path`` :data:`TASKS_DIR` (the
packaged tasks, e.g. ``nemodiff_code_completion``: the embedded model's held-out functions,
offline) unless the command line names its own ``--include_path``, and hands the command line to
``lm_eval.__main__.cli_evaluate``, so every lm-eval option works as documented::

    nemodiff-lm-eval --model nemodiff --model_args pretrained=runs/demo_cpu/hf,mode=linear_spec \\
        --tasks nemodiff_code_completion --apply_chat_template --limit 20
    nemodiff-lm-eval --model nemodiff \\
        --model_args pretrained=<hf dir or run dir>,mode=linear_spec,block_size=32,max_gen_toks=256 \\
        --tasks gsm8k --device cuda --output_path results/          # gsm8k's data come from the Hub

(``python -m nemodiff_train.cli.lm_eval`` is the same; ``lm_eval run ...`` style with the
``run`` sub-command works too. With a ``--include_path`` of your own, add ours by hand: lm-eval
takes one directory.)
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["TASKS_DIR", "with_packaged_tasks", "main"]

TASKS_DIR = Path(__file__).resolve().parents[1] / "eval" / "lm_eval_tasks"
"""lm-eval task YAMLs shipped with the package (``nemodiff_code_completion``)."""


def with_packaged_tasks(argv: list[str]) -> list[str]:
    """``argv`` plus ``--include_path TASKS_DIR`` when it names no include path itself."""
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        return list(argv)
    return [*argv, "--include_path", str(TASKS_DIR)]


def main() -> None:
    import nemodiff_train.eval.lm_eval_plugin  # noqa: F401  - registers "nemodiff"
    from lm_eval.__main__ import cli_evaluate

    from ._console import interactive, quiet_libraries

    quiet_libraries(progress_bars=interactive())
    sys.argv[1:] = with_packaged_tasks(sys.argv[1:])
    cli_evaluate()


if __name__ == "__main__":
    main()
