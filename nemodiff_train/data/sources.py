"""Where documents come from: :class:`SourceSpec` and robust row readers (the JSON file readers and the
items they yield are in :mod:`.readers`).

A source is one of

* a local file: ``.jsonl``, ``.jsonl.gz``, ``.json``, ``.json.gz`` (JSON lines, or one JSON array
  when the first non-blank character is ``[``), ``.parquet``, ``.arrow``;
* a local directory (all such files below it, recursively, sorted; names starting with ``.``
  and the metadata files of ``Dataset.save_to_disk`` — ``dataset_info.json``, ``state.json``,
  ``dataset_dict.json`` — are ignored) or a glob pattern (``data/*.jsonl``, ``**`` allowed);
* otherwise a Hugging Face Hub data set name (``org/name``, with optional ``config`` and
  ``split``), loaded with :func:`datasets.load_dataset` (``streaming=True`` when the spec asks).

JSON-lines files are read line by line in binary, so each bad row is reported with its
``file:line`` and skipped instead of failing the whole run: invalid UTF-8 (also a lone surrogate
``\\udXXX`` escape, which is valid JSON but not encodable), invalid JSON, a value
that is not an object, a missing/null field, a field of the wrong type, empty text, or text over
``max_chars`` characters (reasons in :mod:`nemodiff_train.data.report`). Blank lines are ignored
silently. Lines are read with a bounded buffer (a 100 MB line is skipped without being held in
memory), and a gzip file cut mid-stream keeps its rows up to the cut (one ``corrupt-file`` skip).
Parquet/arrow files and Hub data sets go through ``datasets`` (streamed, so nothing is copied into
the ``datasets`` cache) and get the same per-row checks, with the 1-based row number in place of
the line.

Readers yield :class:`Row` (a usable value) and :class:`Skip` (a dropped row) items *in file
order*, rather than writing to a report themselves, so the caller can stop at exactly
``max_documents`` valid documents and still count only the skips before that point (the report
is then the same whatever the tokenisation parallelism).

``SourceSpec.split`` is the split *of the input* (a Hub split name such as ``train``); which
*output* split a source feeds is decided by ``DataPrepConfig.sources`` vs ``val_sources``.
"""

from __future__ import annotations

import glob as globmod
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from . import report as R
from .readers import Row, Skip, SourceError, first_nonblank_byte, iter_json_array, iter_json_lines

__all__ = [
    "SourceSpec",
    "SUPPORTED_SUFFIXES",
    "resolve_files",
    "iter_texts",
    "iter_messages",
]

SUPPORTED_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".arrow")
_JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
_GLOB_CHARS = set("*?[")
# metadata that `Dataset.save_to_disk` writes next to its .arrow shards: not data
_HF_METADATA_FILES = {"dataset_info.json", "state.json", "dataset_dict.json"}


@dataclass
class SourceSpec:
    """One input of a preparation.

    Attributes:
        path_or_name: local file / directory / glob, or a Hugging Face Hub data set name.
        weight: relative share of *tokens* this source gets in a blend (> 0); see
            :mod:`nemodiff_train.data.blend`.
        split: input split to read (Hub data sets; local parquet/arrow files are read whole).
        text_field: field holding the document text (pretraining).
        messages_field: field holding the chat messages (SFT).
        name: label used in reports and ``meta.json`` (default: ``path_or_name``).
        config: Hub data set configuration name (``load_dataset(name, config)``).
        streaming: stream a Hub data set instead of downloading it first (local files are
            always streamed). Does not change the output, so it is not part of the fingerprint.
        revision: Hub data set revision (a branch, tag or commit): pins what is downloaded.
    """

    path_or_name: str
    weight: float = 1.0
    split: str = "train"
    text_field: str = "text"
    messages_field: str = "messages"
    name: str | None = None
    config: str | None = None
    streaming: bool = False
    revision: str | None = None

    def __post_init__(self) -> None:
        self.path_or_name = str(self.path_or_name)
        if not self.path_or_name:
            raise ValueError("SourceSpec.path_or_name is empty")
        self.weight = float(self.weight)
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"source {self.path_or_name!r}: weight must be a positive number, got {self.weight}")

    @property
    def label(self) -> str:
        """Name used in messages, reports and ``meta.json``."""
        return self.name or self.path_or_name

    @classmethod
    def parse(cls, text: str, **defaults: Any) -> "SourceSpec":
        """Parse the command-line form of a source.

        Two forms:

        * ``PATH[:WEIGHT]`` — e.g. ``data/web.jsonl:3`` or ``org/dataset``; the part after the
          last ``:`` is a weight only if it parses as a number;
        * ``key=value,key=value`` — keys are the field names (``path`` is accepted for
          ``path_or_name``), e.g. ``path=org/ds,config=en,split=train,weight=2``.

        ``defaults`` (e.g. ``text_field=...`` from ``--text-field``) fill fields the text omits.
        """
        text = text.strip()
        kwargs = dict(defaults)
        if "=" in text and ("," in text or text.split("=", 1)[0].strip() in _SPEC_KEYS | {"path"}):
            for part in text.split(","):
                if not part.strip():
                    continue
                key, sep, value = part.partition("=")
                key = key.strip()
                key = "path_or_name" if key == "path" else key
                if not sep or key not in _SPEC_KEYS:
                    known = ", ".join(["path"] + sorted(_SPEC_KEYS - {"path_or_name"}))
                    raise ValueError(f"bad source {text!r}: unknown key {key!r} (known: {known})")
                value = value.strip()
                kwargs[key] = value.lower() in ("1", "true", "yes") if key == "streaming" else value
            if "path_or_name" not in kwargs:
                raise ValueError(f"bad source {text!r}: no path=")
            return cls(**kwargs)
        path, sep, weight = text.rpartition(":")
        if sep and path:
            try:
                kwargs["weight"] = float(weight)
            except ValueError:  # not a number: the ':' belongs to the name
                path = text
            return cls(path, **kwargs)
        return cls(text, **kwargs)


_SPEC_KEYS = {"path_or_name", "weight", "split", "text_field", "messages_field", "name", "config", "streaming",
              "revision"}


# ----------------------------------------------------------------------------------- resolving


def _has_supported_suffix(name: str) -> bool:
    return name.lower().endswith(SUPPORTED_SUFFIXES)


def resolve_files(spec: SourceSpec) -> list[Path] | None:
    """Local files of ``spec`` in a deterministic order, or ``None`` for a Hub data set name.

    Raises:
        SourceError: a local path/glob/directory that does not exist or holds no supported file.
    """
    p = spec.path_or_name
    path = Path(os.path.expanduser(p))
    if any(c in p for c in _GLOB_CHARS):
        files = sorted(Path(f) for f in globmod.glob(os.path.expanduser(p), recursive=True))
        files = [f for f in files if f.is_file() and _has_supported_suffix(f.name)]
        if not files:
            raise SourceError(f"source {spec.label!r}: pattern {p!r} matches no {'/'.join(SUPPORTED_SUFFIXES)} file")
        return files
    if path.is_dir():
        files = sorted(
            f
            for f in path.rglob("*")
            if f.is_file()
            and _has_supported_suffix(f.name)
            and f.name not in _HF_METADATA_FILES
            and not any(part.startswith(".") for part in f.relative_to(path).parts)
        )
        if not files:
            raise SourceError(f"source {spec.label!r}: directory {p!r} contains no {'/'.join(SUPPORTED_SUFFIXES)} file")
        return files
    if path.is_file():
        if not _has_supported_suffix(path.name):
            raise SourceError(f"source {spec.label!r}: {p!r} is not one of {', '.join(SUPPORTED_SUFFIXES)}")
        return [path]
    # Not on disk. Something that is clearly meant as a path is an error here, not a Hub lookup.
    if p.startswith(("/", "./", "../", "~")) or _has_supported_suffix(p) or os.sep + os.sep in p:
        raise SourceError(f"source {spec.label!r}: no such file or directory: {p!r}")
    return None


# ------------------------------------------------------------------------------------- reading


def _iter_datasets(
    builder_or_name: str, where_prefix: str, spec: SourceSpec, **load_kwargs
) -> Iterator[tuple[str, Any]]:
    """Rows of a parquet/arrow file or a Hub data set through ``datasets.load_dataset``."""
    import datasets

    is_hub = not load_kwargs
    try:
        if is_hub:
            ds = datasets.load_dataset(builder_or_name, spec.config, split=spec.split, streaming=spec.streaming,
                                       revision=spec.revision)
        else:
            ds = datasets.load_dataset(builder_or_name, split="train", streaming=True, **load_kwargs)
        it = iter(ds)
        n = 0
        while True:
            try:
                row = next(it)
            except StopIteration:
                return
            n += 1
            yield f"{where_prefix}:{n}", row
    except SourceError:
        raise
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        if is_hub:
            offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
            hint = (
                "HF_HUB_OFFLINE is set, so only the local Hugging Face cache was searched and it is not there"
                if offline
                else "the Hub may be unreachable from this machine (or, if the data set is already in the "
                "Hugging Face cache, set HF_HUB_OFFLINE=1 to use it without the network)"
            )
            raise SourceError(
                f"source {spec.label!r}: {spec.path_or_name!r} is not a local file or directory, so it was "
                f"loaded as a Hugging Face Hub data set (config={spec.config!r}, split={spec.split!r}) and that "
                f"failed: {type(e).__name__}: {e}. {hint[0].upper() + hint[1:]}. Download the data set where "
                "the Hub is reachable and point the source at the local files (jsonl/parquet/arrow)."
            ) from e
        raise SourceError(f"source {spec.label!r}: cannot read {where_prefix}: {type(e).__name__}: {e}") from e


def _iter_raw(spec: SourceSpec, max_chars: int) -> Iterator[tuple[str, Any] | Skip]:
    """All raw rows of a source, file after file, as ``(where, row)`` or :class:`Skip`."""
    files = resolve_files(spec)
    if files is None:
        yield from _iter_datasets(spec.path_or_name, spec.label, spec)
        return
    for path in files:
        lower = path.name.lower()
        if lower.endswith(_JSON_SUFFIXES):
            try:
                if lower.endswith((".json", ".json.gz")) and first_nonblank_byte(path) == b"[":
                    yield from iter_json_array(path, max_chars)
                else:
                    yield from iter_json_lines(path, max_chars)
            except (OSError, EOFError, zlib.error) as e:  # unreadable file, gzip header/array body corrupt
                raise SourceError(f"source {spec.label!r}: cannot read {path}: {type(e).__name__}: {e}") from e
        else:
            builder = "parquet" if lower.endswith(".parquet") else "arrow"
            yield from _iter_datasets(builder, str(path), spec, data_files=[str(path)])


def _encodable(text: str) -> bool:
    """False for strings with lone surrogates (JSON allows ``"\\ud800"``; tokenizers choke on it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _field(where: str, row: Any, field: str) -> Any | Skip:
    if not isinstance(row, dict):
        return Skip(where, R.NOT_AN_OBJECT, f"got {type(row).__name__}")
    if row.get(field) is None:  # absent, or null (parquet fills absent columns with null)
        return Skip(where, R.MISSING_FIELD, f"no {field!r} field")
    return row[field]


def iter_texts(spec: SourceSpec, max_chars: int) -> Iterator[Row | Skip]:
    """Document texts of ``spec`` (field ``spec.text_field``), in order, with bad rows as Skip."""
    for item in _iter_raw(spec, max_chars):
        if isinstance(item, Skip):
            yield item
            continue
        where, row = item
        text = _field(where, row, spec.text_field)
        if isinstance(text, Skip):
            yield text
        elif not isinstance(text, str):
            yield Skip(where, R.WRONG_TYPE, f"{spec.text_field!r} is {type(text).__name__}, not a string")
        elif not text.strip():
            yield Skip(where, R.EMPTY_TEXT)
        elif len(text) > max_chars:
            yield Skip(where, R.OVER_LONG_CHARS, f"{len(text)} > max_chars={max_chars}")
        elif not _encodable(text):
            yield Skip(where, R.NON_UTF8, "lone surrogate escape in the JSON string")
        else:
            yield Row(where, text)


def iter_messages(spec: SourceSpec, max_chars: int) -> Iterator[Row | Skip]:
    """Chat message lists of ``spec`` (field ``spec.messages_field``), in order.

    Only the container is checked here (a list, total content within ``max_chars``); roles,
    order and contents are checked by :func:`nemodiff_train.data.sft.check_conversation`.
    """
    for item in _iter_raw(spec, max_chars):
        if isinstance(item, Skip):
            yield item
            continue
        where, row = item
        messages = _field(where, row, spec.messages_field)
        if isinstance(messages, Skip):
            yield messages
        elif not isinstance(messages, list):
            yield Skip(where, R.WRONG_TYPE, f"{spec.messages_field!r} is {type(messages).__name__}, not a list")
        else:
            contents = [m["content"] for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str)]
            n_chars = sum(map(len, contents))
            if n_chars > max_chars:
                yield Skip(where, R.OVER_LONG_CHARS, f"{n_chars} > max_chars={max_chars}")
            elif not all(map(_encodable, contents)):
                yield Skip(where, R.NON_UTF8, "lone surrogate escape in the JSON string")
            else:
                yield Row(where, messages)
