"""What an export publishes about its sources (no machine paths) and pinned Hub downloads (revision).

The Hub cannot be reached here: downloads are checked against huggingface_hub's own cache layout
(offline, a real lookup by commit) or by recording the arguments ``snapshot_download`` /
``datasets.load_dataset`` receive (mocks of the Hub only).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nemodiff_train.export.provenance import hub_snapshot, public_record, public_reference, public_source

pytestmark = pytest.mark.unit

SHA = "0123456789abcdef0123456789abcdef01234567"
ADAPTER_SHA = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.mark.parametrize("value,public", [
    ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B"), ("embedded", "embedded"), ("embedded:pretrain.jsonl.gz", "embedded:pretrain.jsonl.gz"),
    ("/home/alice/models/qwen", "local:qwen"), ("/home/alice/data/train.jsonl", "local:train.jsonl"),
    ("~/data/x.parquet", "local:x.parquet"), ("data/train.jsonl", "data/train.jsonl"),
    (f"/root/.cache/huggingface/hub/models--Qwen--Qwen3-0.6B/snapshots/{SHA}", "Qwen/Qwen3-0.6B"),
    ("C:\\Users\\bob\\m", "local:m"), ("per token: on for draft / denoise", "per token: on for draft / denoise"),
])
def test_public_reference(value, public):
    assert public_reference(value) == public


def test_sources_keep_their_weights_and_keys():
    assert public_source("/srv/a/web.jsonl:3") == "local:web.jsonl:3"
    assert public_source("path=/srv/a/code,weight=2,revision=abc") == "path=local:code,weight=2,revision=abc"
    assert public_source("path=org/ds,config=en,revision=v1") == "path=org/ds,config=en,revision=v1"


def test_record_has_no_absolute_path_and_says_how_paths_are_written():
    rec = public_record({"base_model": f"/x/hub/models--acme--base/snapshots/{SHA}", "data_sources": ["/d/t.jsonl"],
                         "stages": [{"name": "s", "sources": ["/d/t.jsonl:2"]}], "extra": {"where": "/run/dir"}})
    assert rec["base_model"] == "acme/base" and rec["base_model_revision"] == SHA
    assert rec["data_sources"] == ["local:t.jsonl"] and rec["stages"][0]["sources"] == ["local:t.jsonl:2"]
    assert rec["extra"]["where"] == "local:dir" and "local:<file or directory name>" in rec["paths"]
    assert hub_snapshot("/x/models--a--b/snapshots/nothex") is None


def test_model_revision_reaches_the_download_and_the_run_record(monkeypatch, tmp_path):
    import huggingface_hub

    from nemodiff_train import runs
    from nemodiff_train.assets.resolve import resolve_model_path
    from nemodiff_train.config.load import compose

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: calls.append((repo, kw.get("revision"))) or str(tmp_path))
    assert resolve_model_path("acme/base", revision="v1.2") == tmp_path and calls == [("acme/base", "v1.2")]
    cfg = compose(["recipe=tiny_cpu", "model.path=acme/base", "model.revision=v1.2"])
    record = runs.run_record(cfg, 5)
    assert record["base_model"] == "acme/base" and record["base_model_revision"] == "v1.2"


def test_data_set_revision_is_parsed_passed_and_fingerprinted(monkeypatch):
    import datasets

    from nemodiff_train.data.prepare import _spec_dict
    from nemodiff_train.data.sources import SourceSpec, _iter_datasets

    spec = SourceSpec.parse("path=acme/corpus,revision=abc123,split=train")
    assert spec.revision == "abc123"
    seen = {}

    def fake_load_dataset(name, config=None, **kw):
        seen.update(kw, name=name)
        return [{"text": "hello world"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    list(_iter_datasets("acme/corpus", "acme/corpus", spec))
    assert seen["name"] == "acme/corpus" and seen["revision"] == "abc123"
    assert "revision" not in _spec_dict(SourceSpec.parse("acme/corpus"))  # old fingerprints unchanged
    assert _spec_dict(spec)["revision"] == "abc123"


def test_adapter_remote_code_loads_the_base_at_its_recorded_revision(tmp_path, monkeypatch):
    """An adapter export whose base is a Hub id: the remote code downloads it at the recorded commit
    (here: huggingface_hub's offline cache lookup by that commit; without the revision it would look
    for refs/main, which this cache lacks, and fail)."""
    from nemodiff_train.export import export_adapter
    from nemodiff_train.models.hf import load_dlm
    from tests.unit.test_adapter import randomize
    from tests.unit.test_export_remote_code import load_remote_class
    from tests.unit.test_export_support import make_base

    base = make_base(tmp_path / "base", "qwen3", tie=False)
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-base" / "snapshots" / SHA
    shutil.copytree(base, snapshot)
    dlm = load_dlm(snapshot, mask_token=5, untie_head=False, settings={"inference_block_size": 4})
    dlm.add_adapter(rank=4, alpha=8.0)
    randomize(dlm.adapter, scale=0.3)
    out = export_adapter(dlm, tmp_path / "adapter", base_path=str(snapshot), remote_code=True)
    rec = json.loads((out / "config.json").read_text())["nemodiff"]
    assert rec["adapter"]["base_hub_id"] == "acme/tiny-base" and rec["adapter"]["base_revision"] == SHA
    assert rec["adapter"]["base_path"] is None and rec["base_model"] == "acme/tiny-base"
    assert str(tmp_path) not in "".join(p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())
    cls = json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].split(".")[1]
    remote = load_remote_class(out, cls).from_pretrained(out, cache_dir=str(cache), local_files_only=True,
                                                         trust_remote_code=True)
    import torch

    for key, value in dlm.hf.state_dict().items():
        assert torch.equal(remote.state_dict()[key], value), key
    # the adapter itself from the Hub (cache) at a revision: the revision reaches its own files too
    shutil.copytree(out, cache / "models--acme--drafter" / "snapshots" / ADAPTER_SHA)
    again = load_remote_class(out, cls).from_pretrained("acme/drafter", revision=ADAPTER_SHA, cache_dir=str(cache),
                                                        local_files_only=True)
    for key, value in dlm.hf.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
