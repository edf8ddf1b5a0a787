"""Hostile data files: every bad row is counted and reported by file, line and reason; the good rows
are kept; memory stays bounded; a configurable bad fraction stops preparation with a clear error."""

from __future__ import annotations

import gzip
import json
import random
import tracemalloc

import pytest

from nemodiff_train.data import report as R
from nemodiff_train.data.ingest import _checked_items
from nemodiff_train.data.prepare import DataPrepConfig, prepare
from nemodiff_train.data.readers import Row, Skip, SourceError
from nemodiff_train.data.sources import SourceSpec, iter_texts

pytestmark = [pytest.mark.faults, pytest.mark.slow]  # a 100 MB line and preparation + training runs

GOOD = {"text": "def return self value import class"}


def _lines(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def _split(items):
    rows = [i for i in items if isinstance(i, Row)]
    skips = {i.where.rsplit(":", 1)[1]: i.reason for i in items if isinstance(i, Skip)}
    return rows, skips


def test_binary_junk_and_invalid_utf8_are_reported_per_line(tmp_path):
    junk = tmp_path / "junk.jsonl"
    rng = random.Random(0)
    junk.write_bytes(json.dumps(GOOD).encode() + b"\n" + bytes(rng.randrange(256) for _ in range(20000)) + b"\n"
                     + b'{"text": "caf\xe9 au lait"}\n' + json.dumps(GOOD).encode() + b"\n")
    rows, skips = _split(list(iter_texts(SourceSpec(str(junk)), max_chars=1000)))
    assert [r.where for r in rows][0] == f"{junk}:1" and rows[-1].where.startswith(f"{junk}:")
    assert skips and set(skips.values()) <= {R.NON_UTF8, R.BAD_JSON}
    n_lines = junk.read_bytes().count(b"\n")
    assert len(rows) + len(skips) <= n_lines and skips[str(n_lines - 1)] == R.NON_UTF8  # the latin-1 row


def test_a_100_mb_line_is_skipped_in_bounded_memory(tmp_path):
    big = tmp_path / "big.jsonl"
    with open(big, "w") as f:
        f.write(json.dumps(GOOD) + "\n" + '{"text": "')
        for _ in range(100):
            f.write("a" * (1 << 20))
        f.write('"}\n' + json.dumps(GOOD) + "\n")
    tracemalloc.start()
    try:
        rows, skips = _split(list(iter_texts(SourceSpec(str(big)), max_chars=100_000)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r.where for r in rows] == [f"{big}:1", f"{big}:3"] and skips == {"2": R.OVER_LONG_CHARS}
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB while reading a 100 MiB line"  # limit: 12*max_chars + 1 MiB


def test_wrong_types_and_empty_documents(tmp_path):
    f = _lines(tmp_path / "types.jsonl", [GOOD, {"text": 5}, {"text": None}, [1, 2], '"a string"', {"text": ["a"]},
                                          {"other": "x"}, {"text": ""}, {"text": "   "}, "{not json", GOOD])
    rows, skips = _split(list(iter_texts(SourceSpec(str(f)), max_chars=1000)))
    assert [r.where for r in rows] == [f"{f}:1", f"{f}:11"]
    assert skips == {"2": R.WRONG_TYPE, "3": R.MISSING_FIELD, "4": R.NOT_AN_OBJECT, "5": R.NOT_AN_OBJECT,
                     "6": R.WRONG_TYPE, "7": R.MISSING_FIELD, "8": R.EMPTY_TEXT, "9": R.EMPTY_TEXT, "10": R.BAD_JSON}


def test_chat_rows_with_unknown_role_or_no_assistant_turn(tmp_path):
    u, a = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    f = _lines(tmp_path / "chat.jsonl", [{"messages": [u, a]}, {"messages": [u, {"role": "wizard", "content": "x"}]},
                                         {"messages": [u]}, {"messages": [{"role": "system", "content": "s"}]},
                                         {"messages": [u, {"role": "assistant", "content": " "}]},
                                         {"messages": "hi"}, {"messages": []}, {"messages": [u, a]}])
    rows, skips = _split(list(_checked_items(SourceSpec(str(f)), "sft", 1000, [])))
    assert [r.where for r in rows] == [f"{f}:1", f"{f}:8"]
    assert skips == {"2": R.BAD_ROLE, "3": R.BAD_ORDER, "4": R.BAD_ORDER, "5": R.NO_ASSISTANT_TOKENS,
                     "6": R.WRONG_TYPE, "7": R.BAD_MESSAGES}


def test_gzip_cut_mid_stream_keeps_the_rows_before_the_cut(tmp_path):
    f = tmp_path / "cut.jsonl.gz"
    rows = [{"text": f"document number {i} " + "def return self " * 20} for i in range(400)]
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    f.write_bytes(data[: len(data) // 2])
    got, skips = _split(list(iter_texts(SourceSpec(str(f)), max_chars=10_000)))
    assert 0 < len(got) < 400 and [r.value for r in got] == [r["text"] for r in rows[: len(got)]]
    assert skips == {str(len(got) + 1): R.CORRUPT_FILE}


def test_parquet_without_the_column_fails_naming_it(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"content": ["a b c", "d e f"]}), f)
    rows, skips = _split(list(iter_texts(SourceSpec(str(f)), max_chars=1000)))
    assert rows == [] and skips == {"1": R.MISSING_FIELD, "2": R.MISSING_FIELD}


def _hostile_dir(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    _lines(d / "a_good.jsonl", [{"text": f"def value {i} " + "import class for in " * 5} for i in range(40)])
    _lines(d / "b_bad.jsonl", [{"text": 7}, "{oops", {"text": ""}, [1]])
    (d / "c_junk.jsonl").write_bytes(b"\x00\xff\xfe garbage \x80\x81\n")
    return d


def test_preparation_reports_bad_rows_and_trains_on_the_good_ones(assets, tmp_path):
    d = _hostile_dir(tmp_path)
    cfg = DataPrepConfig(kind="pretrain", sources=[str(d)], tokenizer=str(assets / "model"), seq_len=16,
                         out=str(tmp_path / "out"), val_fraction=0.0)
    logged = []
    prepare(cfg, log=logged.append)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["report"]["skipped"] == {R.BAD_JSON: 1, R.EMPTY_TEXT: 1, R.NON_UTF8: 1, R.NOT_AN_OBJECT: 1,
                                         R.WRONG_TYPE: 1}
    assert f"{d / 'b_bad.jsonl'}:1: {R.WRONG_TYPE}" in meta["report"]["examples"][0]
    assert any(f"{d / 'c_junk.jsonl'}:1: {R.NON_UTF8}" in e for e in meta["report"]["examples"])
    assert meta["sources"][0]["documents"] == 40 and any("5 malformed rows skipped" in line for line in logged)


def test_bad_fraction_over_the_limit_stops_with_a_clear_error(assets, tmp_path):
    d = _hostile_dir(tmp_path)
    cfg = DataPrepConfig(kind="pretrain", sources=[str(d)], tokenizer=str(assets / "model"), seq_len=16,
                         out=str(tmp_path / "out"), val_fraction=0.0, max_bad_fraction=0.05)
    with pytest.raises(SourceError, match=r"5 of 45 rows \(11\.1%\) were skipped, over max_bad_fraction=0\.05") as e:
        prepare(cfg, log=None)
    assert f"{d / 'b_bad.jsonl'}:1" in str(e.value) and not (tmp_path / "out").exists()
    cfg.max_bad_fraction = 0.2
    prepare(cfg, log=None)
    assert (tmp_path / "out" / "meta.json").is_file()
