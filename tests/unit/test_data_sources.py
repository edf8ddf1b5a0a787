"""Reading sources: formats, malformed rows (counted, reported as file:line), errors naming the source."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from nemodiff_train.data import DataPrepConfig, SourceError, SourceSpec, prepare
from nemodiff_train.data.readers import Row, Skip
from nemodiff_train.data.sources import iter_messages, iter_texts, resolve_files
from tests.helpers.tiny_tokenizer import make_tiny_tokenizer

pytestmark = pytest.mark.unit

TEXTS = ["first document here", "second one, a bit longer than the first", "third"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_tiny_tokenizer(d)
    return str(d)


def _texts(spec, max_chars=1000):
    items = list(iter_texts(spec, max_chars))
    return [i.value for i in items if isinstance(i, Row)], [i for i in items if isinstance(i, Skip)]


@pytest.mark.unit
def test_every_local_format_reads_the_same_rows(tmp_path):
    import datasets

    rows = [{"text": t, "id": i} for i, t in enumerate(TEXTS)]
    jsonl = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "a.jsonl").write_text(jsonl)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(jsonl)
    (tmp_path / "c.json").write_text(json.dumps(rows, indent=1))  # a JSON array
    (tmp_path / "d.json").write_text(jsonl)  # .json holding JSON lines
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "e.parquet"))
    ds.save_to_disk(str(tmp_path / "f_arrow"))
    for name in ["a.jsonl", "b.jsonl.gz", "c.json", "d.json", "e.parquet", "f_arrow"]:
        texts, skips = _texts(SourceSpec(str(tmp_path / name)))
        assert texts == TEXTS and skips == [], name
    # a directory: every supported file below it, sorted (a.jsonl, b..., c, d, e, f_arrow/...)
    texts, _ = _texts(SourceSpec(str(tmp_path)))
    assert texts == TEXTS * 6
    texts, _ = _texts(SourceSpec(str(tmp_path / "*.json*")))  # glob: a.jsonl b.jsonl.gz c.json d.json
    assert texts == TEXTS * 4
    # where of a JSON array item / parquet row
    items = list(iter_texts(SourceSpec(str(tmp_path / "c.json")), 1000))
    assert items[1].where == f"{tmp_path / 'c.json'}:#2"
    items = list(iter_texts(SourceSpec(str(tmp_path / "e.parquet")), 1000))
    assert items[2].where == f"{tmp_path / 'e.parquet'}:3"


def _write_malformed(path: Path) -> dict[int, str]:
    """A jsonl file with one row of each kind of defect; returns {line: reason}."""
    lines = [
        b'{"text": "a good first row of text"}',  # 1
        b'{"text": "unterminated',  # 2
        b"[1, 2, 3]",  # 3
        b'{"other": "no text field"}',  # 4
        b'{"text": null}',  # 5
        b'{"text": 42}',  # 6
        b'{"text": "   \\n "}',  # 7
        b'{"text": "caf\xe9 latin-1 byte"}',  # 8
        b'{"text": "' + b"x" * 101 + b'"}',  # 9
        b"",  # 10 blank: ignored, not counted
        b'{"text": "another good row"}\r',  # 11 (CRLF line end)
        b'{"text": "lone surrogate \\ud800 escape"}',  # 12: valid JSON, not encodable
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return {
        2: "bad-json",
        3: "not-an-object",
        4: "missing-field",
        5: "missing-field",
        6: "wrong-type",
        7: "empty-text",
        8: "non-utf8",
        9: "over-long-chars",
        12: "non-utf8",
    }


@pytest.mark.unit
def test_malformed_rows_are_counted_and_reported_with_file_and_line(tmp_path, tok_dir):
    src = tmp_path / "bad.jsonl"
    expected = _write_malformed(src)
    texts, skips = _texts(SourceSpec(str(src)), max_chars=100)
    assert texts == ["a good first row of text", "another good row"]
    assert {int(s.where.rsplit(":", 1)[1]): s.reason for s in skips} == expected

    out = prepare(
        DataPrepConfig(kind="pretrain", sources=[str(src)], tokenizer=tok_dir, seq_len=4, out=str(tmp_path / "out"),
                       val_fraction=0.0, max_chars=100),
        log=None,
    )
    meta = json.loads((out / "meta.json").read_text())
    want = {}
    for reason in expected.values():
        want[reason] = want.get(reason, 0) + 1
    assert meta["report"]["skipped"] == want
    assert meta["sources"][0]["documents"] == 2
    for line, reason in expected.items():
        assert any(e.startswith(f"{src}:{line}: {reason}") for e in meta["report"]["examples"]), (line, reason)


@pytest.mark.unit
def test_source_without_valid_rows_is_an_error_naming_it(tmp_path, tok_dir):
    src = tmp_path / "allbad.jsonl"
    src.write_text('not json\n{"text": ""}\n{"nope": 1}\n')
    out = tmp_path / "out"
    cfg = DataPrepConfig(kind="pretrain", sources=[SourceSpec(str(src), name="my-web-crawl")], tokenizer=tok_dir,
                         seq_len=8, out=str(out))
    with pytest.raises(SourceError, match="my-web-crawl.*no valid document.*bad-json 1"):
        prepare(cfg, log=None)
    assert not out.exists()
    assert not list(tmp_path.glob("out.tmp-*"))


@pytest.mark.unit
def test_sft_rows_are_checked(tmp_path):
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rows = [{"messages": good}, {"messages": "not a list"}, {"text": "no messages"}]
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = list(iter_messages(SourceSpec(str(src)), 1000))
    assert [type(i).__name__ for i in items] == ["Row", "Skip", "Skip"]
    assert [i.reason for i in items[1:]] == ["wrong-type", "missing-field"]
    assert items[0].value == good


@pytest.mark.unit
def test_missing_local_paths_and_hub_names(tmp_path, monkeypatch):
    with pytest.raises(SourceError, match="no such file"):
        resolve_files(SourceSpec(str(tmp_path / "missing.jsonl")))
    with pytest.raises(SourceError, match="matches no"):
        resolve_files(SourceSpec(str(tmp_path / "*.jsonl")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="contains no"):
        resolve_files(SourceSpec(str(tmp_path / "empty")))
    assert resolve_files(SourceSpec("some-org/some-dataset")) is None

    # No Hub here: whatever datasets raises must come back naming the source and saying what to do.
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'some-org/some-dataset' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    spec = SourceSpec("some-org/some-dataset", config="en", name="hubsrc")
    with pytest.raises(SourceError, match=r"hubsrc.*Hugging Face Hub.*HF_HUB_OFFLINE"):
        list(iter_texts(spec, 1000))


@pytest.mark.unit
def test_source_spec_parse():
    assert SourceSpec.parse("data/web.jsonl") == SourceSpec("data/web.jsonl")
    assert SourceSpec.parse("data/web.jsonl:2.5") == SourceSpec("data/web.jsonl", weight=2.5)
    assert SourceSpec.parse("org/ds:notaweight").path_or_name == "org/ds:notaweight"
    s = SourceSpec.parse("path=org/ds,config=en,split=validation,weight=3,streaming=true", text_field="body")
    assert (s.path_or_name, s.config, s.split, s.weight, s.streaming, s.text_field) == (
        "org/ds", "en", "validation", 3.0, True, "body")
    assert SourceSpec.parse("path=data/x.jsonl") == SourceSpec("data/x.jsonl")
    with pytest.raises(ValueError, match="weight"):
        SourceSpec.parse("a.jsonl:0")
    with pytest.raises(ValueError, match="unknown key"):
        SourceSpec.parse("path=a.jsonl,colour=blue")
