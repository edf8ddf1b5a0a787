"""The items a source reader yields (:class:`Row`, :class:`Skip`), :class:`SourceError`, and the
readers of JSON files (JSON lines and JSON arrays, plain or gzip).

Lines are read in binary with a bounded buffer, so each bad row is reported with its ``file:line``
(invalid UTF-8, invalid JSON, a line too long) and skipped instead of failing the whole run, and a
gzip file cut mid-stream keeps its rows up to the cut. :mod:`.sources` picks the reader for each
file and applies the per-field checks.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from . import report as R

__all__ = ["Row", "Skip", "SourceError", "iter_json_array", "iter_json_lines", "first_nonblank_byte"]


class SourceError(ValueError):
    """A whole source is unusable (missing, unreadable, Hub unreachable, no valid row)."""


@dataclass
class Row:
    """A row whose field passed the generic checks; ``value`` is the text or the messages list."""

    where: str
    value: Any


@dataclass
class Skip:
    """A dropped row: ``where`` is ``"file:line"``, ``reason`` one of the report constants."""

    where: str
    reason: str
    detail: str | None = None


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def first_nonblank_byte(path: Path) -> bytes:
    with _open_binary(path) as f:
        while True:
            chunk = f.read(4096)
            if not chunk:
                return b""
            stripped = chunk.lstrip(b" \t\r\n\xef\xbb\xbf")  # whitespace and a UTF-8 BOM
            if stripped:
                return stripped[:1]


def _raw_limit(max_chars: int) -> int:
    """Bytes of one raw line (or JSON-array file) held in memory at most: a line this long cannot
    hold a field of ``max_chars`` characters plus sane metadata (UTF-8 and JSON escapes take up to
    12 bytes per character, hence the factor)."""
    return 12 * max_chars + (1 << 20)


def _bounded_lines(f, limit: int) -> Iterator[tuple[bytes, int]]:
    """``(line, its length in bytes)`` of a binary stream, holding at most ``limit`` + 1 bytes: the
    head of a longer line is returned truncated (length still exact), the rest read and dropped in
    1 MiB pieces, so a 100 MB line (or a binary file without newlines) never sits in memory."""
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        n = len(raw)
        if n > limit and not raw.endswith(b"\n"):
            while True:
                rest = f.readline(1 << 20)
                n += len(rest)
                if not rest or rest.endswith(b"\n"):
                    break
        yield raw, n


def iter_json_lines(path: Path, max_chars: int) -> Iterator[tuple[str, Any] | Skip]:
    """``(where, parsed JSON)`` per non-blank line of a JSON-lines file, or :class:`Skip`.

    A gzip stream that ends early or is corrupt yields one ``corrupt-file`` skip at the line where it
    broke; the rows before it are kept (the rest of the file cannot be read).
    """
    raw_limit = _raw_limit(max_chars)
    lineno = 0
    with _open_binary(path) as f:
        lines = _bounded_lines(f, raw_limit)
        while True:
            try:
                raw, n_bytes = next(lines)
            except StopIteration:
                return
            except (EOFError, OSError, zlib.error) as e:  # truncated / corrupt gzip, I/O error
                yield Skip(f"{path}:{lineno + 1}", R.CORRUPT_FILE,
                           f"{type(e).__name__}: {e}; the rest of the file is unreadable")
                return
            lineno += 1
            where = f"{path}:{lineno}"
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            if n_bytes > raw_limit:
                yield Skip(where, R.OVER_LONG_CHARS, f"line of {n_bytes} bytes")
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Skip(where, R.NON_UTF8, f"byte {e.start}: {raw[e.start:e.start + 4]!r}")
                continue
            try:
                yield where, json.loads(line)
            except ValueError as e:
                yield Skip(where, R.BAD_JSON, str(e))


def iter_json_array(path: Path, max_chars: int) -> Iterator[tuple[str, Any] | Skip]:
    """Items of a file holding one JSON array; ``where`` is ``file:#item`` (1-based).

    The array is parsed whole, so files over :func:`_raw_limit` bytes are refused (convert them to
    JSON lines) rather than loaded."""
    limit = _raw_limit(max_chars)
    with _open_binary(path) as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise SourceError(f"{path}: a JSON array file over {limit:,} bytes is not loaded into memory; "
                          "convert it to JSON lines (one object per line)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        yield Skip(f"{path}:{lineno}", R.NON_UTF8, "the whole file is skipped")
        return
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        yield Skip(f"{path}:{e.lineno}", R.BAD_JSON, f"{e.msg}; the whole file is skipped")
        return
    if not isinstance(items, list):  # '[' was the first char, so this cannot happen; be safe
        yield Skip(f"{path}:1", R.NOT_AN_OBJECT, "expected a JSON array")
        return
    for i, item in enumerate(items, 1):
        yield f"{path}:#{i}", item
