"""Deterministic fault injection for the reliability suite (``tests/faults``, ``tools/fault_campaign.py``).

Set ``NEMODIFF_FAULT=<point>:<n>[:<action>][@<rank>]`` and the process fails the ``n``-th time
(1-based) it reaches ``<point>``. Points (each reached once per event):

* ``step``: an optimizer step whose forward/backward are done but whose update is not (mid-step);
* ``checkpoint``: a checkpoint save whose shards are written but whose manifest/``COMPLETE`` are not;
* ``prune``: a save after the new checkpoint was renamed into place, before old ones are pruned;
* ``export``: an export after its weights were written, before the directory is renamed into place;
* ``data``: data preparation after each ingested batch of rows (mid data-preparation).
* ``distill``: a distill set's generation after each atomic file write, before its rename (mid-chunk).

Actions: ``kill`` (default: ``SIGKILL`` to itself, nothing is flushed or cleaned up), ``term`` and
``usr1`` (send that signal to itself, as a scheduler's preemption would), ``enospc`` (raise
``OSError(ENOSPC)``, as a full disk would). ``@<rank>`` restricts the fault to one rank (default:
every rank). Unset, :func:`fault_point` costs one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal

__all__ = ["fault_point", "ENV"]

ENV = "NEMODIFF_FAULT"
_counts: dict[str, int] = {}
_ACTIONS = {"kill", "term", "usr1", "enospc"}


def _parse(text: str) -> tuple[str, int, str, int | None]:
    spec, _, rank = text.partition("@")
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit() or (len(parts) == 3 and parts[2] not in _ACTIONS):
        raise ValueError(f"{ENV}={text!r}: expected <point>:<n>[:{'|'.join(sorted(_ACTIONS))}][@<rank>]")
    return parts[0], int(parts[1]), parts[2] if len(parts) == 3 else "kill", int(rank) if rank else None


def fault_point(point: str) -> None:
    """Fail here if ``NEMODIFF_FAULT`` names this point and this is its ``n``-th visit."""
    text = os.environ.get(ENV)
    if not text:
        return
    name, n, action, rank = _parse(text)
    if name != point or (rank is not None and rank != int(os.environ.get("RANK", "0"))):
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] != n:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action in ("term", "usr1"):
        os.kill(os.getpid(), signal.SIGTERM if action == "term" else signal.SIGUSR1)
    else:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected by {ENV}={text})")
