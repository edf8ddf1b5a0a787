"""The engine registry (nemodiff_train/engines/__init__.py): the orchestration picks engines by name or
by a run directory's layout, hands them typed options, and reports a source they cannot export."""

from __future__ import annotations

import importlib.util
import inspect

import pytest

from nemodiff_train import orchestrate, runs
from nemodiff_train.config.schema import Config
from nemodiff_train.engines import (ENGINES, ExportSourceError, TrainOptions, engine_of_run, get_engine)
from nemodiff_train.export import ExportError

pytestmark = pytest.mark.unit

HAVE_BRIDGE = importlib.util.find_spec("megatron") is not None


def test_every_registered_engine_loads_without_its_framework_and_has_its_name():
    for name in ENGINES:
        engine = get_engine(name)  # the Megatron engine's module imports no Megatron
        assert engine.name == name
        assert {"train", "owns_run", "export_is_current", "export_source"} <= set(dir(engine))
    with pytest.raises(ValueError, match=r"engine.name='jax' is not an engine; known: \['megatron', 'torch'\]"):
        get_engine("jax")


def test_the_orchestration_has_no_branch_on_an_engine_name():
    source = inspect.getsource(orchestrate)
    assert "engine.name ==" not in source and "engine.name !=" not in source and '"megatron"' not in source


def _megatron_run(tmp_path):
    run = tmp_path / "run"
    (run / runs.CHECKPOINTS_DIR / "0_pretrain").mkdir(parents=True)
    (run / runs.CHECKPOINTS_DIR / "0_pretrain" / runs.MEGATRON_LATEST).write_text("4")
    return run


def test_a_run_is_exported_by_the_engine_whose_layout_it_has(tmp_path):
    assert engine_of_run(_megatron_run(tmp_path)).name == "megatron"
    torch_run = tmp_path / "torch_run"
    runs.checkpoint_dir(torch_run, 3).mkdir(parents=True)
    assert engine_of_run(torch_run).name == "torch"
    assert engine_of_run(tmp_path / "some_hf_dir").name == "torch"  # the default reads HF directories


def test_megatron_export_refuses_a_non_empty_out_before_converting(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="output directory .*out is not empty"):
        orchestrate.export_any(_megatron_run(tmp_path), out)
    assert (out / "keep.txt").read_text() == "x"


@pytest.mark.skipif(HAVE_BRIDGE, reason="needs an environment without megatron-bridge")
def test_megatron_export_without_the_bridge_says_what_to_install(tmp_path):
    run = _megatron_run(tmp_path)
    with pytest.raises(ExportError, match="is a Megatron run: exporting it needs megatron-bridge importable"):
        orchestrate.export_any(run, tmp_path / "out")
    with pytest.raises(ExportSourceError):
        with get_engine("megatron").export_source(run, tmp_path / "out", overwrite=False):
            pass


@pytest.mark.parametrize("engine, options, other", [
    ("torch", TrainOptions(callbacks=[object()]), "Megatron-engine options"),
    ("megatron", TrainOptions(loss_terms=[object()]), "torch-engine options"),
])
def test_an_engine_refuses_options_it_cannot_honour(tmp_path, engine, options, other):
    with pytest.raises(ValueError, match=other):
        get_engine(engine).train(Config(), tmp_path / "run", options)
    assert not (tmp_path / "run").exists()  # refused before anything started
