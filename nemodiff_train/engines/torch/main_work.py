"""Long work one rank does while the others wait on a file, never on a collective.

Data preparation, a Hub download, the export and evaluation at the end can take hours on one rank.
Waiting for them in ``dist.barrier()`` would hit the process group's time-out (NCCL's watchdog
kills the job). Here the worker writes ``<run.dir>/.sync/<launch id>/<name>.done`` (or ``.failed``
with the error) when it is done, and the other ranks poll for it with their own, long time-out
(``engine.main_work_timeout_s``); no collective is pending meanwhile. The launch id is broadcast
once at start, so a requeued job never mistakes an earlier attempt's files for its own.

``per_node=True`` runs the work on every node's local rank 0 instead (a node-local Hub cache holds
only what that node downloaded): ranks wait for their own node's file and read its result.

Fault injection for tests: ``NEMODIFF_DEBUG_SLOW_MAIN=<name>:<seconds>[,<name>:<seconds>]`` makes the
worker sleep before that work (e.g. ``data:25`` with ``engine.dist_timeout_s=10``).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Callable, TypeVar

from .distributed import DistEnv, broadcast_object

__all__ = ["MainWork", "MainWorkError", "node_rank"]

T = TypeVar("T")
DEBUG_ENV = "NEMODIFF_DEBUG_SLOW_MAIN"


class MainWorkError(RuntimeError):
    """The worker failed, or did not finish within ``engine.main_work_timeout_s``."""


def node_rank() -> int:
    """This process's node: torchrun's ``GROUP_RANK``, else ``RANK // LOCAL_WORLD_SIZE``."""
    if "GROUP_RANK" in os.environ:
        return int(os.environ["GROUP_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")) // max(local_world, 1)


def _debug_delay(name: str) -> float:
    for item in filter(None, os.environ.get(DEBUG_ENV, "").split(",")):
        key, _, seconds = item.partition(":")
        if key.strip() == name:
            return float(seconds)
    return 0.0


class MainWork:
    """Runs named work on rank 0 (or one rank per node) while the other ranks wait on files.

    All ranks must construct it (one broadcast) and call :meth:`run` with the same names in the same
    order. One process: :meth:`run` just calls the function.
    """

    def __init__(self, env: DistEnv, run_dir: Path, timeout_s: float, poll_s: float = 0.5):
        self.env = env
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        launch = broadcast_object(uuid.uuid4().hex[:12] if env.is_main else None)
        self.dir = Path(run_dir) / ".sync" / launch

    def run(self, name: str, fn: Callable[[], T], *, per_node: bool = False) -> T | None:
        """``fn()`` on the worker; every rank returns its result (JSON-able) or None for no result."""
        if self.env.world_size == 1:
            return self._work(name, fn)
        worker = self.env.local_rank == 0 if per_node else self.env.is_main
        tag = f"{name}.node{node_rank()}" if per_node else name
        self.dir.mkdir(parents=True, exist_ok=True)
        done, failed = self.dir / f"{tag}.done", self.dir / f"{tag}.failed"
        if worker:
            try:
                result = self._work(name, fn)
            except BaseException as e:
                _write(failed, f"{type(e).__name__}: {e}")
                raise
            _write(done, json.dumps(result))
            return result
        deadline = time.monotonic() + self.timeout_s
        while not done.exists():
            if failed.exists():
                raise MainWorkError(f"{name!r} failed on the rank doing it: {failed.read_text()}")
            if time.monotonic() > deadline:
                raise MainWorkError(f"{name!r} did not finish within engine.main_work_timeout_s="
                                    f"{self.timeout_s:g} s (no {done})")
            time.sleep(self.poll_s)
        return json.loads(done.read_text())

    @staticmethod
    def _work(name: str, fn: Callable[[], T]) -> T:
        delay = _debug_delay(name)
        if delay:
            time.sleep(delay)
        return fn()


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers never see a half-written file
