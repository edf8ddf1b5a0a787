"""Pure-Python scoring helpers shared by the bundled tasks (no torch, no model).

Every function takes plain strings (plus, for token metrics, an optional ``encode`` callable) so
it can be checked on hand-written examples.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Sequence

__all__ = ["first_nonempty_line", "token_accuracy", "cut_at_function_end", "ast_valid", "exact_match",
           "strict_answer", "flexible_answer", "normalise_number"]

Encode = Callable[[str], Sequence[int]]


def first_nonempty_line(text: str) -> str:
    """The first line of ``text`` that is not blank, stripped ("" when there is none)."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def exact_match(output: str, reference: str) -> float:
    """1.0 when the two texts are equal after stripping surrounding whitespace."""
    return float(output.strip() == reference.strip())


def token_accuracy(output: str, reference: str, encode: Encode | None = None, budget: int | None = None) -> float:
    """Position-wise fraction of reference tokens that the output reproduces.

    ``acc = #{i < len(ref) : out[i] == ref[i]} / len(ref)``. Extra output tokens past the reference
    cost nothing (generation may legitimately run on); missing ones count as errors.

    Args:
        encode: text -> token ids (the model's tokenizer, without special tokens). ``None`` falls
            back to whitespace-separated words, for use without a tokenizer.
        budget: compare only the first ``budget`` reference tokens. The evaluator passes its
            ``max_new_tokens`` so that a reference longer than what the decoder was allowed to
            write is not scored as errors the decoder could not avoid.
    Returns:
        A value in [0, 1]; 1.0 for an empty reference (nothing to reproduce).
    """
    split = encode if encode is not None else str.split
    ref = list(split(reference))
    out = list(split(output))
    if budget is not None:
        ref = ref[:budget]
    if not ref:
        return 1.0
    hits = sum(1 for a, b in zip(out, ref) if a == b)
    return hits / len(ref)


def cut_at_function_end(body: str) -> str:
    """Keep the output up to where the function ends: the first non-blank line at column 0.

    Prompts are dedented so their ``def`` sits at column 0 and the body is indented; a line that
    starts at column 0 after the body means the model went on to write module-level code (often
    the next function). Lines are kept with their newlines. An output whose first non-blank line
    is already at column 0 has no body, so the result is "".
    """
    kept: list[str] = []
    for line in body.splitlines(keepends=True):
        if line.strip() and not line[0].isspace():
            break
        kept.append(line)
    return "".join(kept)


def ast_valid(prompt: str, body: str) -> float:
    """1.0 when ``prompt + body`` (body cut at the function's end) parses as Python.

    An empty body counts as invalid: a signature plus docstring alone is valid Python, and counting
    it would reward a model for writing nothing.
    """
    cut = cut_at_function_end(body)
    if not cut.strip():
        return 0.0
    try:
        ast.parse(prompt + cut)
    except (SyntaxError, ValueError):  # ValueError: source contains NUL bytes
        return 0.0
    return 1.0


# lm-eval's gsm8k filters: "strict-match" takes the number after "#### ", "flexible-extract" the
# last number anywhere in the output.
_STRICT_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")
_ANY_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalise_number(text: str) -> str:
    """Drop thousands separators, a dollar sign and a trailing full stop ("1,200." -> "1200")."""
    return text.replace(",", "").replace("$", "").rstrip(".")


def strict_answer(output: str) -> str | None:
    """The first ``#### <number>`` answer of ``output`` (normalised), or None (GSM8K's strict match)."""
    found = _STRICT_ANSWER.search(output)
    return normalise_number(found.group(1)) if found else None


def flexible_answer(output: str) -> str | None:
    """The last number in ``output`` (normalised), or None (GSM8K's flexible extract)."""
    found = _ANY_NUMBER.findall(output)
    if not found:
        return None
    last = found[-1]
    return normalise_number(last[0] or last[1])
