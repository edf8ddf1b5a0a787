"""SFT data: chat conversations rendered with the tokenizer's chat template, assistant-only loss.

Each row's ``messages`` is a list of ``{"role", "content"}`` with roles ``system`` / ``user`` /
``assistant``. :func:`check_conversation` accepts ``[system] user assistant (user assistant)*``:
an optional leading system message, then strictly alternating user/assistant turns, ending on an
assistant turn (a trailing user turn would have nothing to supervise). Every content must be a
string and must not contain a control-token string of the tokenizer such as ``<|im_end|>``: the
template renders text and tokenizes it whole, so such a string would become a real turn marker.
Violations skip the row with a reason (:mod:`nemodiff_train.data.report`).

Loss mask (:class:`SftEncoder`): 1 exactly on the tokens the assistant must generate; prompt,
system and template-header tokens are always 0. Two ways, chosen per tokenizer:

* the template has ``{% generation %}`` tags (and the tokenizer is a fast one, which gives the
  character offsets this needs): ``apply_chat_template(..., return_dict=True,
  return_assistant_tokens_mask=True)`` — the template itself says what is generated (for ChatML
  templates usually the content and ``<|im_end|>``);
* no tags (most templates): render the prefix up to each assistant turn with
  ``add_generation_prompt=True`` (prompt + assistant header) and the prefix including that turn;
  the tokens between the two token counts are the assistant's. This also marks what the template
  writes after the turn's end marker (ChatML's ``"\\n"``), which is harmless. The full rendering
  must start with both prefixes token for token; templates that rewrite earlier turns (e.g. ones
  that drop past reasoning) break that and such rows are skipped as ``template-mismatch``.

Length: conversations longer than ``seq_len`` tokens are skipped as ``over-long-tokens``, or,
with ``truncate=True``, cut to ``seq_len`` tokens (skipped anyway if no assistant token is left).
No EOS is appended: the template's own end-of-turn token ends the conversation.

Layout: each conversation is one document. ``pack=True`` (:func:`layout_packed`) fills rows of L
best-fit-decreasing (conversations are never split, since a continuation without its prompt
teaches nothing) and pads the rest of the row. ``pack=False`` (:func:`layout_padded`) puts
one conversation per row. Padding: pad id, ``loss_mask`` 0, its own document id.
"""

from __future__ import annotations

import re

import numpy as np

from . import report as R
from .packing import Layout

__all__ = [
    "ROLES",
    "check_conversation",
    "has_generation_tags",
    "SftEncoder",
    "layout_packed",
    "layout_padded",
]

ROLES = ("system", "user", "assistant")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def check_conversation(messages, control_strings: list[str] = ()) -> tuple[str, str] | None:
    """Return ``(reason, detail)`` if ``messages`` is not a usable conversation, else ``None``."""
    if not isinstance(messages, list) or not messages:
        return R.BAD_MESSAGES, "empty message list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return R.BAD_MESSAGES, f"message {i} is not an object with 'role' and 'content'"
        if m["role"] not in ROLES:
            return R.BAD_ROLE, f"message {i} has role {m['role']!r}"
        if not isinstance(m["content"], str):
            return R.BAD_MESSAGES, f"message {i} content is {type(m['content']).__name__}, not a string"
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    if not body:
        return R.BAD_ORDER, "no user/assistant turn"
    for i, role in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            return R.BAD_ORDER, f"expected {expected} at turn {i + len(roles) - len(body)}, got {role}"
    if body[-1] != "assistant":
        return R.BAD_ORDER, "ends with a user turn"
    if not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
        return R.NO_ASSISTANT_TOKENS, "every assistant message is empty"
    for i, m in enumerate(messages):
        for s in control_strings:
            if s in m["content"]:
                return R.SPECIAL_TOKEN_IN_CONTENT, f"message {i} contains {s!r}"
    return None


def has_generation_tags(tok) -> bool:
    """Whether the tokenizer's (default) chat template marks assistant text with generation tags."""
    try:
        template = tok.get_chat_template()
    except Exception:  # no template at all
        return False
    return bool(_GENERATION_TAG.search(template or ""))


class SftEncoder:
    """``encoder(conversations) -> [(ids uint32 [n], mask uint8 [n]) or (reason, detail)]``."""

    def __init__(self, tok, seq_len: int, truncate: bool = False, use_generation_tags: bool | None = None) -> None:
        if not getattr(tok, "chat_template", None):
            raise ValueError("the tokenizer has no chat_template; SFT data is rendered with it")
        self.tok = tok
        self.seq_len = seq_len
        self.truncate = truncate
        if use_generation_tags is None:
            # the assistant mask is computed from character offsets, which only fast tokenizers give
            use_generation_tags = has_generation_tags(tok) and bool(getattr(tok, "is_fast", False))
        self.use_generation_tags = use_generation_tags

    def _ids(self, messages, **kw) -> list[int]:
        return list(self.tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])

    def encode(self, messages) -> tuple[np.ndarray, np.ndarray] | tuple[str, str]:
        """Token ids and assistant mask of one (already checked) conversation, or a skip reason."""
        try:
            if self.use_generation_tags:
                out = self.tok.apply_chat_template(
                    messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
                )
                ids = np.asarray(out["input_ids"], dtype=np.uint32)
                mask = np.asarray(out["assistant_masks"], dtype=np.uint8)
            else:
                full = self._ids(messages)
                ids = np.asarray(full, dtype=np.uint32)
                mask = np.zeros(len(full), dtype=np.uint8)
                for k, m in enumerate(messages):
                    if m["role"] != "assistant":
                        continue
                    prompt = self._ids(messages[:k], add_generation_prompt=True)
                    upto = self._ids(messages[: k + 1])
                    if full[: len(prompt)] != prompt or full[: len(upto)] != upto:
                        return R.TEMPLATE_MISMATCH, f"rendering up to message {k} is not a prefix of the whole"
                    mask[len(prompt) : len(upto)] = 1
        except Exception as e:  # a template may raise on anything (jinja errors, its own checks)
            return R.TEMPLATE_ERROR, f"{type(e).__name__}: {e}"
        if len(ids) > self.seq_len:
            if not self.truncate:
                return R.OVER_LONG_TOKENS, f"{len(ids)} tokens > seq_len={self.seq_len}"
            ids, mask = ids[: self.seq_len], mask[: self.seq_len]
            if not mask.any():
                return R.OVER_LONG_TOKENS, f"no assistant token in the first {self.seq_len} tokens"
        if not mask.any():
            return R.NO_ASSISTANT_TOKENS, "the template marks no assistant token"
        return ids, mask

    def __call__(self, conversations: list) -> list:
        return [self.encode(m) for m in conversations]


def layout_packed(src: np.ndarray, doc: np.ndarray, lengths: np.ndarray, seq_len: int) -> Layout:
    """Best-fit-decreasing packing of whole conversations (each ``<= seq_len``) into rows of ``seq_len``.

    Longest first, each conversation goes into the open row with the LEAST room that still fits it
    (a new row when none does). Next-fit in the blend's order left 43 % of the demo's SFT tokens as
    padding (two 140-token problems never share a 256-token row, and a row is closed at the first
    misfit); best-fit-decreasing left 11 %, so each step trains on more conversations for the same
    compute. Row order carries no meaning: training visits rows in a
    seeded permutation (:mod:`.order`). Ties keep the input order, so the layout is deterministic.

    Args:
        src, doc: ``[n]`` source index and document index of each conversation.
        lengths: ``[n]`` token counts.
    Returns:
        a :class:`Layout` sorted by ``(row, col)``; within a row, conversations in placement order.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n and lengths.max() > seq_len:
        raise ValueError(f"conversation of {int(lengths.max())} tokens does not fit seq_len={seq_len}")
    rooms = _RoomIndex(seq_len)
    row = np.empty(n, dtype=np.int64)
    col = np.empty(n, dtype=np.int64)
    used: list[int] = []  # tokens placed in each row so far
    for i in np.argsort(-lengths, kind="stable").tolist():
        length = int(lengths[i])
        r = rooms.take_smallest_fitting(length)
        if r is None:
            r = len(used)
            used.append(0)
        row[i], col[i] = r, used[r]
        used[r] += length
        if used[r] < seq_len:
            rooms.add(r, seq_len - used[r])
    order = np.lexsort((col, row))
    zeros = np.zeros(n, dtype=np.int64)
    return Layout(
        rows=len(used),
        row=row[order],
        col=col[order],
        src=np.asarray(src, dtype=np.int64)[order],
        doc=np.asarray(doc, dtype=np.int64)[order],
        start=zeros,
        length=lengths[order],
    )


class _RoomIndex:
    """Open rows by free room (``1..seq_len`` tokens): find and remove a row with the least room ``>= need``.

    A segment tree over room sizes counts the open rows per size, so a query is O(log seq_len); each
    size keeps its rows in a LIFO list (which row of a given size is taken does not change the fill).
    """

    def __init__(self, seq_len: int):
        self.size = 1 << max(1, int(seq_len)).bit_length()  # leaves 0..size-1 cover rooms 0..seq_len
        self.count = [0] * (2 * self.size)
        self.rows: dict[int, list[int]] = {}

    def _bump(self, room: int, delta: int) -> None:
        node = room + self.size
        while node:
            self.count[node] += delta
            node //= 2

    def add(self, row: int, room: int) -> None:
        self.rows.setdefault(room, []).append(row)
        self._bump(room, 1)

    def take_smallest_fitting(self, need: int) -> int | None:
        """Remove and return a row whose room is the smallest that is ``>= need`` (None: no row fits)."""
        room = self._first_at_least(1, 0, self.size - 1, need)
        if room is None:
            return None
        row = self.rows[room].pop()
        self._bump(room, -1)
        return row

    def _first_at_least(self, node: int, lo: int, hi: int, need: int) -> int | None:
        if hi < need or self.count[node] == 0:
            return None
        if lo == hi:
            return lo
        mid = (lo + hi) // 2
        left = self._first_at_least(2 * node, lo, mid, need)
        return left if left is not None else self._first_at_least(2 * node + 1, mid + 1, hi, need)


def layout_padded(src: np.ndarray, doc: np.ndarray, lengths: np.ndarray, seq_len: int) -> Layout:
    """One conversation per row (the rest of the row is padding)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > seq_len:
        raise ValueError(f"conversation of {lengths.max()} tokens does not fit seq_len={seq_len}")
    n = len(lengths)
    return Layout(
        rows=n,
        row=np.arange(n, dtype=np.int64),
        col=np.zeros(n, dtype=np.int64),
        src=np.asarray(src, dtype=np.int64),
        doc=np.asarray(doc, dtype=np.int64),
        start=np.zeros(n, dtype=np.int64),
        length=lengths,
    )
