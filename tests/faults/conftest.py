"""Shared fixtures of the fault tier: one tiny model/data set and the uninterrupted reference run."""

from __future__ import annotations

import pytest

from .harness import base_args, check_ok, launch, make_assets


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("fault_assets"))


@pytest.fixture(scope="session")
def baseline(assets, tmp_path_factory):
    """Uninterrupted single-process run (6 steps, checkpoints 4 and 6 kept, exported to hf/)."""
    run = tmp_path_factory.mktemp("fault_runs") / "baseline"
    check_ok(launch(base_args(assets, run), run))
    return run
