"""The stop set where the data layer can reach it: the tokens that end a teacher's generation.

The rule is the evaluator's (:mod:`nemodiff_train.eval.stop_tokens`: the tokenizer's EOS, the
generation config's ``eos_token_id``, then the chat turn terminators the vocabulary has); the data
layer may not import ``eval/`` (tests/unit/test_import_boundaries.py), so the distill stage's
teacher takes it from here. ``tests/unit/test_data_distill.py`` checks that both give the same ids,
so a generated distill set stops exactly where ``nemodiff-eval`` would.

Pure Python: any object with ``eos_token_id`` and ``get_vocab()`` works as the tokenizer.
"""

from __future__ import annotations

__all__ = ["CHAT_END_TOKENS", "stop_token_ids"]

CHAT_END_TOKENS = ("<|im_end|>",)


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [int(value)]
    return [int(v) for v in value]


def stop_token_ids(tokenizer, generation_config=None) -> tuple[int, ...]:
    """EOS, the generation config's ``eos_token_id`` (int or list), chat terminators; de-duplicated.

    Returns:
        The ids in first-seen order (the first is the primary EOS); ``()`` when none is named.
    """
    ids: list[int] = []
    if tokenizer is not None:
        ids.extend(_as_ids(tokenizer.eos_token_id))
    ids.extend(_as_ids(getattr(generation_config, "eos_token_id", None)))
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        ids.extend(int(vocab[t]) for t in CHAT_END_TOKENS if t in vocab)
    return tuple(dict.fromkeys(ids))
