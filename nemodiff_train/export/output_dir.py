"""One output directory, written atomically: check, write into a temporary sibling, verify, commit.

Both exports (the full one, :mod:`.writer`, and the adapter one, :mod:`.adapter`) and every caller
that checks ``out`` before long work (``nemodiff-export`` converting a Megatron run first) go through
here, so the rules are written once:

* :func:`check_replaceable` — ``out`` may be written: it is new, empty, or (with ``overwrite``) an
  earlier export of this toolkit; never a file, never ``out=.`` or ``$HOME``, never the checkpoint
  being exported.
* :func:`atomic_directory` — a context manager that yields ``<out>.tmp-<pid>``; on a clean exit it
  runs ``verify(tmp)`` and renames the directory to ``out`` (an earlier export is moved aside first
  and removed after); on any exception (a fault, Ctrl-C) it removes the temporary directory and the
  parent directories it had to create, so ``out`` is either the complete new export or untouched.

The commit is two renames on one filesystem. A crash between them leaves the earlier export as
``<out>.old-<pid>`` beside a missing ``out``; nothing is ever half-written in ``out`` itself.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import ExportError

__all__ = ["is_earlier_export", "check_replaceable", "atomic_directory"]


def is_earlier_export(path: Path) -> bool:
    """``path`` holds an export of this toolkit: a ``config.json`` with a ``nemodiff`` record, or an
    adapter export (``adapter_config.json`` with one). Only such a directory may be replaced."""
    for name in ("config.json", "adapter_config.json"):
        try:
            record = json.loads((Path(path) / name).read_text()).get("nemodiff")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(record, dict) and record:
            return True
    return False


def check_replaceable(out: Path, overwrite: bool, protect: Sequence[Path] = ()) -> None:
    """Raise :class:`ExportError` (nothing written) unless ``out`` may receive an export.

    Args:
        out: the output directory.
        overwrite: a non-empty ``out`` is replaced, but only when it is an earlier export.
        protect: directories ``out`` must not be, nor lie inside (the checkpoint exported from).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"out {out} exists and is not a directory")
    resolved = out.resolve()
    for p in protect:
        p = Path(p).resolve()
        if p == resolved or resolved in p.parents:
            raise ExportError(f"out {out} would replace the checkpoint it exports from ({p}); choose another directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"out {out} exists and is not empty; pass overwrite=true to replace it")
        if not is_earlier_export(out):  # overwrite replaces what we wrote, never `out=.` or `out=$HOME`
            raise ExportError(f"out {out.resolve()} is not an earlier nemodiff export (no config.json with a "
                              "'nemodiff' record, no adapter export): overwrite=true replaces only those; "
                              "choose an empty or new directory (nothing was changed)")


@contextmanager
def atomic_directory(out: Path, verify: Callable[[Path], None]) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; commit it as ``out`` after ``verify`` passes.

    ``verify(tmp)`` raises (an :class:`ExportError` naming what is missing) to refuse the commit;
    the temporary directory is then removed like after any other failure.
    """
    out = Path(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():  # left by an earlier process with our pid: never ours to keep
        shutil.rmtree(tmp)
    created = [p for p in reversed(tmp.parents) if not p.exists()]  # removed again on failure
    try:
        tmp.mkdir(parents=True)
        yield tmp
        verify(tmp)
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(created):
            try:
                parent.rmdir()
            except OSError:
                break
        raise


def _commit(tmp: Path, out: Path) -> None:
    if out.is_dir() and any(out.iterdir()):
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        return
    if out.is_dir():
        out.rmdir()
    tmp.rename(out)
