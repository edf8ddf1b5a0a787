"""What an export may say about where its model and data came from, without the machine's paths.

An export is published, so its ``nemodiff`` record (config.json, adapter_config.json, the model card)
names sources the way a reader elsewhere can use them, never by this machine's absolute paths:

* a Hub id (``org/name``, a data set name, ``path=org/ds,revision=...``) stays as written;
* a Hub snapshot in the local cache (``.../models--org--name/snapshots/<commit>``) becomes the Hub id,
  and its commit the revision;
* ``embedded`` and ``embedded:<file>`` (shipped with the package) stay;
* any other absolute local path becomes ``local:<its last component>`` (e.g. ``local:train.jsonl``):
  the name says what it was, the path is left out. The record's ``paths`` key says so.

Relative paths are kept (they say nothing about the machine). A drafter adapter's base directory is
written relative to the export directory instead (:func:`relative_base_path`), so an adapter export
kept beside its base still loads without naming either's absolute location.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PureWindowsPath
from typing import Any

__all__ = ["PATHS_NOTE", "public_reference", "public_source", "public_record", "hub_snapshot", "relative_base_path"]

PATHS_NOTE = ("local paths are recorded as local:<file or directory name> (their location on the exporting machine "
              "is left out); Hub ids as written")
_SNAPSHOT = re.compile(r"(?:^|/)(models|datasets)--([^/]+?)--([^/]+)/snapshots/([0-9a-f]{7,64})(?:/|$)")


def _is_absolute(text: str) -> bool:
    return text.startswith(("/", "~", "\\\\")) or bool(PureWindowsPath(text).drive)


def hub_snapshot(path: str) -> tuple[str, str] | None:
    """``(org/name, commit)`` of a path inside the Hugging Face cache, else ``None``."""
    m = _SNAPSHOT.search(str(path).replace("\\", "/"))
    return (f"{m.group(2)}/{m.group(3)}", m.group(4)) if m else None


def public_reference(value: Any) -> Any:
    """A model or file reference as an export may publish it (see the module docstring)."""
    if not isinstance(value, str) or not value or any(c.isspace() for c in value) or not _is_absolute(value):
        return value
    snapshot = hub_snapshot(value)
    if snapshot:
        return snapshot[0]
    name = re.split(r"[\\/]", value.rstrip("/\\"))[-1] or "root"  # POSIX or Windows separators
    return f"local:{name}"


def public_source(text: Any) -> Any:
    """A data source string (``PATH[:WEIGHT]`` or ``key=value,...``) with its path made public."""
    if not isinstance(text, str):
        return text
    if "=" in text:
        parts = []
        for part in text.split(","):
            key, sep, value = part.partition("=")
            parts.append(f"{key}{sep}{public_reference(value.strip())}" if key.strip() in ("path", "path_or_name")
                         else part)
        return ",".join(parts)
    path, sep, weight = text.rpartition(":")
    if sep and path and _is_number(weight):
        return f"{public_reference(path)}:{weight}"
    return public_reference(text)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def public_record(record: dict) -> dict:
    """The ``nemodiff`` record with every source made public and any other absolute path string too."""
    rec = dict(record)
    base = rec.get("base_model")
    snapshot = hub_snapshot(base) if isinstance(base, str) else None
    if snapshot and not rec.get("base_model_revision"):
        rec["base_model_revision"] = snapshot[1]
    rec["data_sources"] = [public_source(s) for s in rec.get("data_sources") or []]
    rec["stages"] = [{**s, "sources": [public_source(x) for x in s.get("sources") or []]} if isinstance(s, dict) else s
                     for s in rec.get("stages") or []]
    rec = _public_strings(rec)
    rec["paths"] = PATHS_NOTE
    return rec


def _public_strings(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _public_strings(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_public_strings(v) for v in obj]
    return public_reference(obj) if isinstance(obj, str) else obj


def relative_base_path(base: str | os.PathLike | None, out: Path) -> str | None:
    """A local base model directory relative to the export directory ``out`` (``None`` for none)."""
    if not base:
        return None
    base = Path(os.path.expanduser(str(base)))
    if not base.is_absolute():
        base = base.resolve()
    try:
        return Path(os.path.relpath(base, Path(out).resolve())).as_posix()
    except ValueError:  # another drive (Windows): no relative form
        return None
