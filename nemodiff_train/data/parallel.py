"""Ordered, bounded parallel map used to tokenize batches of documents.

``ordered_map(fn, batches, num_proc)`` yields ``fn(batch)`` for each batch *in input order*:

* ``num_proc == 1``: in this process (no pool, no pickling);
* ``num_proc > 1``: a :mod:`multiprocessing` pool, with at most ``2 * num_proc`` batches in
  flight. ``Pool.imap`` would instead drain the whole input iterator into its task queue, i.e.
  read the entire corpus into memory before the first result comes back.

Workers get their state (the encoder holding the tokenizer) from ``initializer(*initargs)``.
The pool uses the ``fork`` start method where the platform has it: children then share the
already-imported ``transformers`` instead of re-importing it (seconds per worker with spawn).
The parent never runs the tokenizer before forking in this mode, so the Rust tokenizer's thread
pool is not inherited half-used; where ``fork`` is unavailable, ``spawn`` is used.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from typing import Any, Callable, Iterable, Iterator

__all__ = ["ordered_map"]


def ordered_map(
    fn: Callable[[Any], Any],
    batches: Iterable[Any],
    num_proc: int = 1,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
) -> Iterator[Any]:
    """Yield ``fn(batch)`` for every batch, in order; see the module docstring."""
    if num_proc <= 1:
        if initializer is not None:
            initializer(*initargs)
        for batch in batches:
            yield fn(batch)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    with ctx.Pool(num_proc, initializer=initializer, initargs=initargs) as pool:
        pending: deque = deque()
        it = iter(batches)
        exhausted = False
        while True:
            while not exhausted and len(pending) < 2 * num_proc:
                try:
                    pending.append(pool.apply_async(fn, (next(it),)))
                except StopIteration:
                    exhausted = True
            if not pending:
                return
            yield pending.popleft().get()
