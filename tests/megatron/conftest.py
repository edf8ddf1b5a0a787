"""The Megatron tier: skipped as a whole when megatron-bridge is not installed (INSTALL.md beside this).

Imports go through :mod:`tests.megatron.support.shims` (module-scoped stand-ins for Transformer Engine,
nvidia-modelopt, nvidia-resiliency-ext and transformers names newer versions removed; the
``typing.override`` back-port for Python 3.11). Shims live only under ``tests/``, never in the package. If megatron-bridge IS installed but fails to import, the tests fail (they do
not skip): a broken install must be visible.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

try:
    _present = importlib.util.find_spec("megatron.bridge") is not None
except (ImportError, ValueError):
    _present = False
SKIP_REASON = "megatron-bridge is not installed (see tests/megatron/INSTALL.md)"
# CI (.ci/run) sets NEMODIFF_REQUIRE_MEGATRON=1: a missing install then fails every test, never skips
REQUIRED = os.environ.get("NEMODIFF_REQUIRE_MEGATRON") == "1"

if _present:
    from tests.megatron.support import shims as megatron_shims

    megatron_shims.install()  # an import hook only: Megatron itself is imported by the fixture below


@pytest.fixture(autouse=True, scope="session")
def _megatron_imported():
    """Import Megatron once, when the first test of this directory runs (not at collection: a run that
    deselects this tier never imports it). A broken install fails here; it does not skip."""
    if not _present and REQUIRED:
        pytest.fail(f"NEMODIFF_REQUIRE_MEGATRON=1 but {SKIP_REASON}", pytrace=False)
    if _present:
        import megatron.bridge.training.pretrain  # noqa: F401

        megatron_shims.patch_after_import()
    yield


def pytest_collection_modifyitems(config, items):
    """Every test here is marked ``megatron``; without megatron-bridge the whole directory is skipped
    (test modules import Megatron only inside tests, so they still collect). A module-level
    ``pytest.importorskip`` in this conftest would skip it only when collected from a parent
    directory: ``pytest tests/megatron`` would crash on the initial conftest instead."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.megatron)
            if not _present and not REQUIRED:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture()
def dist_ctx():
    """A world-size-1 gloo process group with Megatron's parallel state (torn down afterwards)."""
    from megatron.bridge.training.model_load_save import temporary_distributed_context

    with temporary_distributed_context(backend="gloo"):
        yield
