"""Bookkeeping of skipped (malformed) rows: counts per reason plus the first few examples.

Every row that preparation drops is counted under one *reason* (the constants below) and, for
the first :data:`MAX_EXAMPLES` rows, remembered as ``"<file>:<line>: <reason> (<detail>)"`` so
a user can open the file at that line. ``<line>`` is the 1-based line of a JSON-lines file, or
the 1-based row of a parquet/arrow file or Hub data set.
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
