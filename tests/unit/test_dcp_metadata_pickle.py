"""DCP checkpoints from someone else: the .metadata pickle and the byte entries never run code.

The corpus (tests/helpers/hostile_pickles.py) is refused by the reader every load goes through; the
fault tier (tests/faults/test_hostile_files.py) feeds it to the export and resume paths too.
"""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from nemodiff_train.runs import DCP_METADATA
from nemodiff_train.runs.dcp import CheckpointError, SafeFileSystemReader, UnsafeCheckpointError, load_dcp
from nemodiff_train.runs.safe_pickle import ALLOWED_CLASSES, ALLOWED_CONSTANTS, ALLOWED_RECONSTRUCTORS
from tests.helpers.hostile_pickles import build_corpus, registered_extensions

pytestmark = pytest.mark.unit


def _model_and_optim():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)).to(torch.bfloat16)
    model.register_buffer("ids", torch.arange(3))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(2, 4, dtype=torch.bfloat16)).sum().backward()
    optim.step()
    return model, optim


def _save(path, state):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path)))
    return path


@pytest.fixture(scope="module")
def real_ckpt(tmp_path_factory):
    model, optim = _model_and_optim()
    return _save(tmp_path_factory.mktemp("dcp") / "ckpt", {"model": get_model_state_dict(model),
                                                          "optim": get_optimizer_state_dict(model, optim)})


def test_a_real_model_and_optimizer_checkpoint_needs_only_the_allowed_names(real_ckpt):
    seen = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    Recorder(open(real_ckpt / DCP_METADATA, "rb")).load()
    assert seen and seen <= ALLOWED_CLASSES | ALLOWED_RECONSTRUCTORS | ALLOWED_CONSTANTS, seen
    assert ("torch.distributed.checkpoint.metadata", "Metadata") in seen and ("torch", "bfloat16") in seen
    md = SafeFileSystemReader(str(real_ckpt)).read_metadata()
    assert "model.0.weight" in md.state_dict_metadata and "optim.param_groups.0.lr" in md.state_dict_metadata


def test_resume_state_loads_through_the_safe_reader_and_planner(real_ckpt):
    """Optimizer settings are byte entries: they load with weights_only=True and keep their values."""
    model, optim = _model_and_optim()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optim)}
    for g in state["optim"]["param_groups"]:
        g["lr"], g["betas"] = 0.5, (0.1, 0.2)
    load_dcp(state, real_ckpt, no_dist=True)
    assert state["optim"]["param_groups"][0]["lr"] == 1e-3 and state["optim"]["param_groups"][0]["betas"] == (0.9, 0.95)


def test_the_corpus_is_made_of_working_attacks(tmp_path):
    """Loaded with plain pickle, every case marked live does create the marker: the refusals below
    refuse real attacks."""
    marker = tmp_path / "ran"
    cases = build_corpus(marker)
    assert len(cases) >= 30 and {c.family for c in cases} >= {"global", "dotted", "function", "opcode", "registry"}
    with registered_extensions():
        for case in cases:
            marker.unlink(missing_ok=True)
            try:
                pickle.loads(case.data)
            except Exception:
                pass
            assert marker.exists() == case.live, case.name


CASE_NAMES = [c.name for c in build_corpus(Path("/nonexistent"))]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_every_hostile_metadata_is_refused_by_the_reader(name, real_ckpt, tmp_path):
    marker = tmp_path / "ran"
    data = next(c for c in build_corpus(marker) if c.name == name).data
    ckpt = tmp_path / "ckpt"
    shutil.copytree(real_ckpt, ckpt)
    (ckpt / DCP_METADATA).write_bytes(data)
    with registered_extensions(), pytest.raises(UnsafeCheckpointError, match="refusing"):
        SafeFileSystemReader(str(ckpt)).read_metadata()
    model, optim = _model_and_optim()
    with registered_extensions(), pytest.raises(UnsafeCheckpointError, match="refusing"):
        load_dcp({"model": get_model_state_dict(model)}, ckpt, no_dist=True)
    assert not marker.exists()


def test_storage_entries_must_stay_inside_the_checkpoint(real_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(real_ckpt, ckpt)
    md = SafeFileSystemReader(str(ckpt)).read_metadata()
    index = next(iter(md.storage_data))
    md.storage_data[index].relative_path = "../../etc/passwd"
    (ckpt / DCP_METADATA).write_bytes(pickle.dumps(md))
    with pytest.raises(UnsafeCheckpointError, match="outside the checkpoint directory"):
        SafeFileSystemReader(str(ckpt)).read_metadata()
    (ckpt / DCP_METADATA).write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(CheckpointError, match="not DCP metadata"):
        SafeFileSystemReader(str(ckpt)).read_metadata()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_hostile_byte_entry_is_refused_and_does_not_run(tmp_path):
    """A byte entry (what optimizer settings are) holding a pickled call: DCP's default planner runs
    it (torch.load(weights_only=False)); load_dcp refuses it."""
    marker = tmp_path / "ran"
    model, _ = _model_and_optim()
    ckpt = _save(tmp_path / "ckpt", {"model": get_model_state_dict(model), "optim": {"lr": _Payload(marker)}})
    state = {"model": get_model_state_dict(model), "optim": {"lr": 0.0}}
    with pytest.raises(UnsafeCheckpointError, match=r"refusing checkpoint entry 'optim.lr'.*weights_only=True"):
        load_dcp(state, ckpt, no_dist=True)
    assert not marker.exists() and state["optim"]["lr"] == 0.0
    with warnings.catch_warnings():  # the attack is real: the stock reader and planner run it
        warnings.filterwarnings("ignore")
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(ckpt)), no_dist=True)
    assert marker.exists()


def test_byte_entries_under_model_are_refused(tmp_path):
    model, _ = _model_and_optim()
    ckpt = _save(tmp_path / "ckpt", {"model": {**get_model_state_dict(model), "extra": {"a": 1}}})
    state = {"model": {**get_model_state_dict(model), "extra": {"a": 0}}}
    with pytest.raises(UnsafeCheckpointError, match=r"refusing checkpoint entry 'model.extra.a'"):
        load_dcp(state, ckpt, no_dist=True)
