"""The one definition of the tokens that end a generation (the *stop set*).

The evaluator (``nemodiff-eval``), the lm-eval plugin, the benchmark, the distill stage's teacher and
the exporter all take the stop set from :func:`stop_token_ids` (it lives in ``models/`` so that every
one of those layers may import it), so an exported model stops under plain ``transformers`` ``generate()``
exactly where ``nemodiff-eval`` stops: the exporter writes the set into ``generation_config.json``
(``eos_token_id`` list) and makes every one of its tokens a special token of the saved tokenizer.

The set is, de-duplicated in this order:

1. the tokenizer's EOS token;
2. the generation config's ``eos_token_id`` (an int or a list);
3. the chat turn terminators of :data:`CHAT_END_TOKENS` that the vocabulary has. Chat-SFT'd
   models end their answer with ``<|im_end|>``, while many tokenizers name a different EOS
   (``<|endoftext|>``); without it a decoder runs past the end of the turn.

Pure Python: nothing here imports transformers; any object with ``eos_token_id`` and
``get_vocab()`` works as the tokenizer.
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
    """Ids that end a generation (module docstring: EOS, generation config, chat terminators).

    Args:
        tokenizer: a Hugging Face tokenizer, or None.
        generation_config: a ``GenerationConfig`` (or anything with ``eos_token_id``), or None.
    Returns:
        The ids, de-duplicated, first-seen order kept (the first is the primary EOS); ``()`` when
        neither argument names any.
    """
    ids: list[int] = []
    if tokenizer is not None:
        ids.extend(_as_ids(tokenizer.eos_token_id))
    ids.extend(_as_ids(getattr(generation_config, "eos_token_id", None)))
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        ids.extend(int(vocab[t]) for t in CHAT_END_TOKENS if t in vocab)
    return tuple(dict.fromkeys(ids))
