"""Count device→host reads (host syncs) while code runs: the measurement behind "one host sync per cycle".

On a GPU every read of a tensor's value by Python (``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)``,
``.numpy()``) and every data-dependent output shape (``nonzero``) waits for the device to finish, so the
Python side cannot run ahead and queue the next kernels. :func:`count_host_syncs` patches those entry
points of ``torch.Tensor`` (and ``torch.nonzero``, ``torch.cuda.synchronize``) for the duration of a
``with`` block and counts the calls, on any device, so the count is the same number on a CPU as on a
GPU. It counts reads of CPU tensors too (they are not syncs on a GPU run when the tensor lives on the
host): an upper bound. Boolean-mask indexing (``x[mask]``), which syncs through ``nonzero`` inside C++,
is not seen; the decoders' cycles do not use it (``torch.cuda.set_sync_debug_mode`` catches it on a GPU:
tests/gpu/test_batched_spec_gpu.py).

    with count_host_syncs() as syncs:
        generate(lm, prompts, "linear_spec", cfg)
    print(syncs.count, syncs.by_kind)
"""

from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["HostSyncCounter", "count_host_syncs"]

_TENSOR_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "nonzero")
_LOCK = threading.Lock()


class HostSyncCounter:
    """What :func:`count_host_syncs` saw.

    Attributes:
        count: host syncs so far (a nested one, e.g. ``tolist`` calling ``item``, counts once).
        by_kind: count per entry point (``"tolist"``, ``"__bool__"``, ...).
    """

    def __init__(self):
        self.count = 0
        self.by_kind: Counter = Counter()
        self._depth = 0

    def _wrap(self, kind: str, original):
        counter = self

        def counted(*args, **kwargs):
            if counter._depth == 0:
                counter.count += 1
                counter.by_kind[kind] += 1
            counter._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                counter._depth -= 1

        return counted


@contextmanager
def count_host_syncs() -> Iterator[HostSyncCounter]:
    """Count host syncs inside the ``with`` block (see the module docstring). Not reentrant across threads."""
    counter = HostSyncCounter()
    patched: list[tuple[object, str, object]] = []
    with _LOCK:
        try:
            for name in _TENSOR_METHODS:
                patched.append((torch.Tensor, name, torch.Tensor.__dict__.get(name)))
                setattr(torch.Tensor, name, counter._wrap(name, getattr(torch.Tensor, name)))
            patched.append((torch, "nonzero", torch.nonzero))
            torch.nonzero = counter._wrap("torch.nonzero", torch.nonzero)
            patched.append((torch.cuda, "synchronize", torch.cuda.synchronize))
            torch.cuda.synchronize = counter._wrap("cuda.synchronize", torch.cuda.synchronize)
            yield counter
        finally:
            for owner, name, original in reversed(patched):
                if original is None:  # the method was inherited (from torch._C.TensorBase): drop our override
                    delattr(owner, name)
                else:
                    setattr(owner, name, original)
