"""Bookkeeping of skipped (malformed) rows: counts per reason plus the first few examples.

Every row that preparation drops is counted under one *reason* (the constants below) and, for
the first :data:`MAX_EXAMPLES` rows, remembered as ``"<file>:<line>: <reason> (<detail>)"`` so
a user can open the file at that line. ``<line>`` is the 1-based line of a JSON-lines file, or
the 1-based row of a parquet/arrow file or Hub data set.

Two reasons are the *policy* working as configured rather than bad data (:data:`POLICY`): rows
longer than ``seq_len`` tokens (SFT conversations are never cut) or than ``max_chars`` characters.
:func:`report_lines` says those as what they are ("520 conversations longer than seq_len=256 left
out") and lists examples only for the malformed rows.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = [
    "MAX_EXAMPLES",
    "SkipReport",
    "BAD_JSON",
    "NOT_AN_OBJECT",
    "MISSING_FIELD",
    "WRONG_TYPE",
    "EMPTY_TEXT",
    "NON_UTF8",
    "OVER_LONG_CHARS",
    "CORRUPT_FILE",
    "OVER_LONG_TOKENS",
    "TOKENIZER_ERROR",
    "BAD_MESSAGES",
    "BAD_ROLE",
    "BAD_ORDER",
    "SPECIAL_TOKEN_IN_CONTENT",
    "TEMPLATE_ERROR",
    "TEMPLATE_MISMATCH",
    "NO_ASSISTANT_TOKENS",
    "POLICY",
    "skip_phrase",
    "report_lines",
]

MAX_EXAMPLES = 20

# reading (sources.py)
BAD_JSON = "bad-json"  # the line is not valid JSON
NOT_AN_OBJECT = "not-an-object"  # valid JSON, but not a {...} object
MISSING_FIELD = "missing-field"  # the text/messages field is absent
WRONG_TYPE = "wrong-type"  # the field has the wrong type (null, number, ...)
EMPTY_TEXT = "empty-text"  # text is empty or whitespace only
NON_UTF8 = "non-utf8"  # the line is not valid UTF-8
OVER_LONG_CHARS = "over-long-chars"  # more characters than max_chars
CORRUPT_FILE = "corrupt-file"  # the file breaks off here (gzip cut mid-stream): its remaining rows are lost
# tokenising
OVER_LONG_TOKENS = "over-long-tokens"  # SFT conversation longer than seq_len (truncate=False)
TOKENIZER_ERROR = "tokenizer-error"  # the tokenizer raised on this document
# chat rows (sft.py)
BAD_MESSAGES = "bad-messages"  # not a non-empty list of {role, content: str}
BAD_ROLE = "bad-role"  # role other than system/user/assistant
BAD_ORDER = "bad-order"  # roles do not follow [system] user assistant user assistant ...
SPECIAL_TOKEN_IN_CONTENT = "special-token-in-content"  # content contains e.g. "<|im_end|>"
TEMPLATE_ERROR = "template-error"  # the chat template raised
TEMPLATE_MISMATCH = "template-mismatch"  # prefix rendering is not a prefix of the full rendering
NO_ASSISTANT_TOKENS = "no-assistant-tokens"  # nothing left to supervise

# Reasons that are a length limit doing its job; formatted with the limits (seq_len, max_chars).
POLICY = {
    OVER_LONG_TOKENS: "longer than seq_len={seq_len} tokens",
    OVER_LONG_CHARS: "longer than max_chars={max_chars} characters",
}


@dataclass
class SkipReport:
    """Counts of skipped rows per reason and the first :data:`MAX_EXAMPLES` examples."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def skip(self, where: str, reason: str, detail: str | None = None) -> None:
        """Record one skipped row at ``where`` (``"file:line"``)."""
        self.counts[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            msg = f"{where}: {reason}"
            if detail:
                detail = " ".join(str(detail).split())  # one line, whatever the detail was
                msg += f" ({detail[:117] + '...' if len(detail) > 120 else detail})"
            self.examples.append(msg)

    def merge(self, other: "SkipReport") -> None:
        """Add ``other``'s counts and (while room is left) its examples."""
        self.counts.update(other.counts)
        room = MAX_EXAMPLES - len(self.examples)
        if room > 0:
            self.examples.extend(other.examples[:room])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """``"bad-json 2, missing-field 1"`` (most frequent first), or ``"none"``."""
        if not self.counts:
            return "none"
        return ", ".join(f"{reason} {n}" for reason, n in self.counts.most_common())

    def to_json(self) -> dict:
        """The ``report`` object of ``meta.json``."""
        return {"skipped": dict(sorted(self.counts.items())), "examples": list(self.examples)}


def _rows(kind: str | None) -> str:
    return "conversations" if kind == "sft" else "documents"


def skip_phrase(counts: dict, *, kind: str | None = None, seq_len: int | None = None,
                max_chars: int | None = None) -> str:
    """One phrase for a source line: ``"21 conversations longer than seq_len=256 tokens left out,
    2 malformed rows skipped (bad-json 2)"``; ``""`` when nothing was dropped."""
    parts = []
    for reason, text in POLICY.items():
        n = counts.get(reason, 0)
        if n:
            parts.append(f"{n} {_rows(kind)} {text.format(seq_len=seq_len, max_chars=max_chars)} left out")
    bad = {r: n for r, n in counts.items() if r not in POLICY and n}
    if bad:
        detail = ", ".join(f"{r} {n}" for r, n in sorted(bad.items(), key=lambda kv: -kv[1]))
        parts.append(f"{sum(bad.values())} malformed rows skipped ({detail})")
    return ", ".join(parts)


def report_lines(report: dict, *, kind: str | None, seq_len: int | None, max_chars: int | None,
                 meta_file: str, examples: int) -> list[str]:
    """Console lines for the ``report`` object of ``meta.json`` (see :meth:`SkipReport.to_json`).

    Policy drops get one line each and a pointer to ``meta_file``; malformed rows get a count by
    reason and their first ``examples`` examples (``file:line: reason (detail)``).
    """
    counts = report.get("skipped") or {}
    lines = []
    for reason, text in POLICY.items():
        n = counts.get(reason, 0)
        if n:
            lines.append(f"{n} {_rows(kind)} {text.format(seq_len=seq_len, max_chars=max_chars)} left out, "
                         f"see {meta_file}")
    bad = {r: n for r, n in counts.items() if r not in POLICY and n}
    if bad:
        lines.append(f"{sum(bad.values())} malformed rows skipped: "
                     + ", ".join(f"{r} {n}" for r, n in sorted(bad.items(), key=lambda kv: -kv[1])))
        shown = [e for e in report.get("examples") or [] if not any(f": {r}" in e for r in POLICY)]
        lines.extend(f"  {e}" for e in shown[:examples])
        if len(shown) > examples:
            lines.append(f"  ... (more examples in {meta_file})")
    return lines
