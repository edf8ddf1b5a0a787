"""Shared pytest setup: small thread counts (2-core CI machines), the repo root on sys.path, and the
``slow`` selection: the tiers marked here and the modules marking themselves ``slow`` run with
``scripts/test.sh --all`` (and in CI, .ci/run), not in the default ``scripts/test.sh``."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    import torch

    torch.set_num_threads(1)  # 2-core CI boxes: more threads contend with subprocesses
    yield


def pytest_collection_modifyitems(config, items):
    """The Slurm tier is slow as a whole: it needs a local Slurm that ``.ci/setup_slurm.sh`` starts (apt-get,
    root) and its jobs wait on Slurm's own signal and time-limit delays. ``scripts/test.sh --all`` runs it."""
    for item in items:
        if item.get_closest_marker("slurm") is not None:
            item.add_marker(pytest.mark.slow)
        _group_for_workers(item)


def _group_for_workers(item) -> None:
    """With pytest-xdist (``scripts/test.sh`` runs two workers, ``--dist loadgroup``): a module's tests stay
    on one worker, so its module-scoped fixtures (a trained run, an export) are built once; and every
    Slurm test shares one group, since they share the one local Slurm cluster and its queue."""
    if item.get_closest_marker("xdist_group") is not None:
        return
    group = "slurm" if item.get_closest_marker("slurm") is not None else item.nodeid.split("::")[0]
    item.add_marker(pytest.mark.xdist_group(name=group))
