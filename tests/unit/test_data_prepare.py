"""prepare(): idempotence, fingerprint guard, atomic writes; PackedDataset; the nemodiff-data CLI."""

from __future__ import annotations

import importlib
import json
import pickle

import numpy as np
import pytest
import torch

from nemodiff_train.data import DataFormatError, DataPrepConfig, DataPrepError, PackedDataset, prepare
from nemodiff_train.data.cli import main
from tests.helpers.tiny_tokenizer import make_tiny_tokenizer

# the module (the package attribute `nemodiff_train.data.prepare` is the function)
prep_mod = importlib.import_module("nemodiff_train.data.prepare")

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_tiny_tokenizer(d)
    return str(d)


@pytest.fixture()
def src(tmp_path):
    texts = [f"document {i}: " + "the quick brown fox " * (i % 6 + 1) for i in range(80)]
    p = tmp_path / "docs.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(p)


def _cfg(src, tok_dir, out, **kw):
    return DataPrepConfig(**{"kind": "pretrain", "sources": [src], "tokenizer": tok_dir, "seq_len": 32, "out": str(out),
                             "val_fraction": 0.05, **kw})


@pytest.mark.unit
def test_rerun_is_a_no_op_and_another_spec_is_refused(tmp_path, src, tok_dir, monkeypatch):
    out = tmp_path / "out"
    prepare(_cfg(src, tok_dir, out), log=None)
    meta_before = (out / "meta.json").read_bytes()
    mtime = (out / "train.tokens.npy").stat().st_mtime_ns

    def no_work(*a, **k):
        raise AssertionError("re-run did work")

    monkeypatch.setattr(prep_mod, "ingest_source", no_work)
    monkeypatch.setattr(prep_mod, "load_tokenizer", no_work)
    lines = []
    assert prepare(_cfg(src, tok_dir, out, num_proc=2), log=lines.append) == out  # num_proc: same spec
    assert "nothing to do" in lines[0]
    assert (out / "meta.json").read_bytes() == meta_before and (out / "train.tokens.npy").stat().st_mtime_ns == mtime

    with pytest.raises(DataPrepError, match="different spec.*refusing to overwrite"):
        prepare(_cfg(src, tok_dir, out, seq_len=64), log=None)
    assert (out / "meta.json").read_bytes() == meta_before

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(DataPrepError, match="not a complete prepared dataset"):
        prepare(_cfg(src, tok_dir, tmp_path / "junk"), log=None)


@pytest.mark.unit
def test_changing_the_tokenizer_files_changes_the_fingerprint(tmp_path, src, tok_dir):
    from shutil import copytree

    tok2 = tmp_path / "tok2"
    copytree(tok_dir, tok2)
    assert prep_mod.fingerprint(_cfg(src, tok_dir, "a")) == prep_mod.fingerprint(_cfg(src, tok_dir, "b"))
    fp = prep_mod.fingerprint(_cfg(src, str(tok2), "a"))
    cfg = json.loads((tok2 / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages }}"
    (tok2 / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tok2 / "chat_template.jinja").unlink(missing_ok=True)
    assert prep_mod.fingerprint(_cfg(src, str(tok2), "a")) != fp


@pytest.mark.unit
@pytest.mark.parametrize("victim", ["write_split", "write_meta"])
def test_crash_mid_write_leaves_no_output(tmp_path, src, tok_dir, monkeypatch, victim):
    out = tmp_path / "out"
    real = getattr(prep_mod, victim)
    calls = []

    def crash_after_first(*a, **k):
        calls.append(1)
        res = real(*a, **k)
        if victim == "write_meta" or len(calls) == 2:  # after train was written / after meta.json
            raise RuntimeError("simulated crash")
        return res

    monkeypatch.setattr(prep_mod, victim, crash_after_first)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(_cfg(src, tok_dir, out), log=None)
    assert not out.exists() and not (out / "meta.json").exists()
    assert not list(tmp_path.glob("out.tmp-*"))  # the build directory was cleaned up
    monkeypatch.undo()
    assert prepare(_cfg(src, tok_dir, out), log=None) == out  # and a retry succeeds
    assert (out / "meta.json").is_file()


@pytest.mark.unit
def test_packed_dataset_round_trip(tmp_path, src, tok_dir):
    out = prepare(_cfg(src, tok_dir, tmp_path / "out"), log=None)
    meta = json.loads((out / "meta.json").read_text())
    assert set(meta) >= {"format_version", "kind", "seq_len", "tokenizer", "vocab_size", "pad_token_id", "eos_token_id",
                         "splits", "sources", "report", "fingerprint"}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["meta.json"] + [f"{s}.{n}.npy" for s in ("train", "val") for n in ("tokens", "docs", "loss_mask")])
    for split in ("train", "val"):
        ds = PackedDataset(out, split)
        tokens = np.load(out / f"{split}.tokens.npy")
        docs = np.load(out / f"{split}.docs.npy")
        mask = np.load(out / f"{split}.loss_mask.npy")
        assert len(ds) == meta["splits"][split]["rows"] == len(tokens) > 0
        assert ds.meta == meta and ds.seq_len == 32
        assert isinstance(ds._open()["tokens"], np.memmap)  # memory-mapped, not loaded
        for i in (0, len(ds) - 1):
            row = ds[i]
            assert row["index"] == i
            assert row["input_ids"].dtype == torch.int64 and row["input_ids"].shape == (32,)
            assert row["doc_ids"].dtype == torch.int64 and row["loss_mask"].dtype == torch.bool
            assert np.array_equal(row["input_ids"].numpy(), tokens[i].astype(np.int64))
            assert np.array_equal(row["doc_ids"].numpy(), docs[i])
            assert np.array_equal(row["loss_mask"].numpy(), mask[i].astype(bool))
        with pytest.raises(IndexError):
            ds[len(ds)]
    ds = PackedDataset(out, "train")
    blob = pickle.dumps(ds)
    assert len(blob) < 4096  # the arrays are re-opened, not pickled
    assert torch.equal(pickle.loads(blob)[3]["input_ids"], ds[3]["input_ids"])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["input_ids"].shape == (4, 32) and batch["index"].tolist() == [0, 1, 2, 3]


@pytest.mark.unit
def test_packed_dataset_errors_name_the_directory(tmp_path, src, tok_dir):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        PackedDataset(missing)
    out = prepare(_cfg(src, tok_dir, tmp_path / "out"), log=None)
    with pytest.raises(KeyError, match="test"):
        PackedDataset(out, "test")
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(DataFormatError, match=r"out.*format_version 99"):
        PackedDataset(out)
    (out / "meta.json").write_text(json.dumps(meta))
    (out / "val.docs.npy").unlink()
    with pytest.raises(FileNotFoundError, match="val.docs.npy"):
        PackedDataset(out, "val")
    (out / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"out.*incomplete"):
        PackedDataset(out)


@pytest.mark.unit
def test_cli(tmp_path, src, tok_dir, capsys):
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"body": f"other text number {i} " * 3}) + "\n" for i in range(30)))
    out = tmp_path / "pt"
    rc = main(["pretrain", "--source", f"{src}:1", "--source", f"path={other},weight=2,text_field=body",
               "--tokenizer", tok_dir, "--seq-len", "32", "--out", str(out), "--val-fraction", "0.1"])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "prepared pretrain data" in printed and "train:" in printed
    meta = json.loads((out / "meta.json").read_text())
    assert [s["weight"] for s in meta["sources"]] == [1.0, 2.0] and meta["seq_len"] == 32

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                      {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                             for i in range(10)))
    rc = main(["sft", "--source", str(chats), "--tokenizer", tok_dir, "--seq-len", "64", "--out", str(tmp_path / "sft"),
               "--no-pack", "--quiet"])
    assert rc == 0 and capsys.readouterr().out == ""
    meta = json.loads((tmp_path / "sft" / "meta.json").read_text())
    assert meta["kind"] == "sft" and meta["options"]["pack"] is False
    assert meta["splits"]["train"]["rows"] + meta["splits"]["val"]["rows"] == 10

    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    assert main(["pretrain", "--source", str(bad), "--tokenizer", tok_dir, "--seq-len", "8", "--out",
                 str(tmp_path / "x")]) == 1
    assert "bad.jsonl" in capsys.readouterr().err
    assert main(["pretrain", "--source", "a.jsonl:-1", "--tokenizer", tok_dir, "--seq-len", "8", "--out", "x"]) == 2
    with pytest.raises(SystemExit):
        main(["pretrain", "--tokenizer", tok_dir])  # argparse: --source etc. required
