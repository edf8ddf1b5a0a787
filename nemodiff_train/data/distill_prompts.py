"""The prompts of a ``distill`` stage: read from any source the data layer reads.

Two forms, chosen by ``data.distill.prompt_field``:

* a prompt column (``prompt_field: prompt``): the row's text becomes one user turn;
* chat rows (``prompt_field: null``, the default): the row's ``messages_field`` list, cut after its
  last user turn. A multi-turn row therefore keeps its earlier turns (system, user, assistant) as
  context and the teacher answers the last user turn; whatever followed that turn (the data set's
  own answer) is dropped.

A row without the field is an error naming ``file:line`` and the field (almost always a wrong
``prompt_field`` / ``messages_field``), not a silent skip. Malformed rows (bad JSON, a conversation
whose roles are out of order, content holding a control-token string such as ``<|im_end|>``, ...)
are skipped with the reasons of :mod:`nemodiff_train.data.report`, exactly as the ``sft`` kind
skips them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

from . import report as R
from .sft import check_conversation
from .readers import Row, Skip
from .sources import SourceSpec, iter_messages, iter_texts

__all__ = ["DistillError", "Prompt", "iter_prompts", "prompt_turns"]


class DistillError(ValueError):
    """A distill set cannot be generated as configured (a missing field, another spec in the way, ...)."""


@dataclass
class Prompt:
    """One prompt: where it was read and the turns the teacher answers (ends on a user turn)."""

    where: str
    messages: list[dict]


def prompt_turns(messages: list, control_strings: list[str] = ()) -> list[dict] | tuple[str, str]:
    """``messages`` up to and including the last user turn, or a ``(reason, detail)`` skip.

    The cut conversation must be what the ``sft`` kind accepts once an assistant turn is added:
    ``[system] user (assistant user)*`` with string contents free of control strings.
    """
    if not isinstance(messages, list) or not messages:
        return R.BAD_MESSAGES, "empty message list"
    last_user = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"),
                    default=None)
    if last_user is None:
        return R.BAD_ORDER, "no user turn to answer"
    turns = [{"role": m["role"], "content": m["content"]} if isinstance(m, dict) and "role" in m and "content" in m
             else m for m in messages[: last_user + 1]]
    bad = check_conversation(turns + [{"role": "assistant", "content": "answer"}], control_strings)
    return bad if bad is not None else turns


def iter_prompts(spec: SourceSpec, prompt_field: str | None, max_chars: int,
                 control_strings: list[str] = ()) -> Iterator[Prompt | Skip]:
    """The prompts of ``spec`` in file order (:class:`Prompt`), malformed rows as :class:`Skip`.

    Raises:
        DistillError: a row lacks the configured field (the message names ``file:line``).
    """
    if prompt_field:
        rows = iter_texts(replace(spec, text_field=prompt_field), max_chars)
        field, key = prompt_field, "data.distill.prompt_field"
    else:
        rows = iter_messages(spec, max_chars)
        field, key = spec.messages_field, "data.messages_field"
    for item in rows:
        if isinstance(item, Skip):
            if item.reason == R.MISSING_FIELD:
                raise DistillError(f"{item.where}: the row has no {field!r} field (set by {key}; "
                                   + ("prompt_field names a text column" if prompt_field else
                                      "or set data.distill.prompt_field to read a prompt column") + ")")
            yield item
            continue
        assert isinstance(item, Row)
        if prompt_field:
            turns = prompt_turns([{"role": "user", "content": item.value}], control_strings)
        else:
            turns = prompt_turns(item.value, control_strings)
        if isinstance(turns, tuple):
            yield Skip(item.where, *turns)
        else:
            yield Prompt(item.where, turns)
