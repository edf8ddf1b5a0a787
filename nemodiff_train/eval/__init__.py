"""Evaluation: the ``nemodiff-eval`` runner (TPF, tokens/s, accuracy per decoding mode on the tasks of
:mod:`nemodiff_train.tasks`) and an lm-evaluation-harness model (``nemodiff``).

Heavy imports (torch, transformers, lm-eval) happen inside the submodules, so
``import nemodiff_train.eval`` stays cheap.
"""
