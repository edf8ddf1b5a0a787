"""lm-eval's own command line with the ``nemodiff`` model registered.

lm-eval 0.4.x finds models only in its built-in table or among classes registered by modules that
were imported before the run; it does not read the ``lm_eval`` entry-point group. This wrapper
imports :mod:`nemodiff_train.eval.lm_eval_plugin` and hands the unchanged command line to
``lm_eval.__main__.cli_evaluate``, so every lm-eval option works as documented::

    python -m nemodiff_train.eval.lm_eval_cli --model nemodiff \\
        --model_args pretrained=<hf dir or run dir>,mode=linear_spec,block_size=32,max_gen_toks=256 \\
        --tasks gsm8k --device cuda --output_path results/

(``lm_eval run ...`` style with the ``run`` sub-command works too.)
"""

from __future__ import annotations


def main() -> None:
    import nemodiff_train.eval.lm_eval_plugin  # noqa: F401  - registers "nemodiff"
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
