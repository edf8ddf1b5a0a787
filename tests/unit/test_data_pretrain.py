"""Pretraining preparation: exact packing, document ids, blends, holdout, parallel tokenisation."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from nemodiff_train.data import DataPrepConfig, SourceSpec, prepare
from nemodiff_train.data.blend import blend, doc_key, holdout
from nemodiff_train.data.pretrain import layout_continuous
from tests.helpers.tiny_tokenizer import make_tiny_tokenizer

pytestmark = pytest.mark.unit

WORDS = "the quick brown fox jumps over a lazy dog while diffusion models denoise masked tokens".split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return make_tiny_tokenizer(d), str(d)


def _docs(n, seed, lo=1, hi=40, prefix=""):
    rng = random.Random(seed)
    return [prefix + " ".join(rng.choices(WORDS, k=rng.randint(lo, hi))) for _ in range(n)]


def _write(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def _load(out, split):
    return [np.load(Path(out) / f"{split}.{n}.npy", mmap_mode="r") for n in ("tokens", "docs", "loss_mask")]


@pytest.mark.unit
def test_layout_continuous_by_hand():
    # lengths 3,5,2,7 (17 tokens), L=4 -> 4 rows, 1 token dropped
    lay = layout_continuous(np.zeros(4), np.arange(4), np.array([3, 5, 2, 7]), 4)
    assert lay.rows == 4 and lay.dropped_tokens == 1
    got = list(zip(lay.row.tolist(), lay.col.tolist(), lay.doc.tolist(), lay.start.tolist(), lay.length.tolist()))
    assert got == [
        (0, 0, 0, 0, 3), (0, 3, 1, 0, 1),
        (1, 0, 1, 1, 4),
        (2, 0, 2, 0, 2), (2, 2, 3, 0, 2),
        (3, 0, 3, 2, 4),
    ]
    empty = layout_continuous(np.zeros(1), np.zeros(1), np.array([3]), 4)
    assert empty.rows == 0 and empty.dropped_tokens == 3


@pytest.mark.unit
def test_packing_is_exact_and_doc_ids_change_at_boundaries(tmp_path, tok):
    tokenizer, tok_dir = tok
    texts = _docs(60, seed=1) + ["a literal <|endoftext|> inside a document is plain text"]
    out = prepare(DataPrepConfig(kind="pretrain", sources=[_write(tmp_path / "d.jsonl", texts)], tokenizer=tok_dir,
                                 seq_len=32, out=str(tmp_path / "out"), val_fraction=0.0), log=None)
    meta = json.loads((out / "meta.json").read_text())
    eos = meta["eos_token_id"]
    tokens, docs, mask = _load(out, "train")
    rows, L = tokens.shape
    assert L == 32 and tokens.dtype == np.uint32 and docs.dtype == np.int32 and mask.dtype == np.uint8
    assert mask.all()  # pretraining: no padding, everything supervised

    expected = [tokenizer(t, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [eos] for t in texts]
    assert sum(1 for e in expected for i in e if i == eos) == len(texts)  # EOS only where appended
    total = sum(map(len, expected))
    assert rows == total // L and meta["splits"]["train"]["dropped_tokens"] == total - rows * L
    assert meta["splits"]["train"]["tokens"] == rows * L == meta["splits"]["train"]["supervised_tokens"]

    # The stream is the documents (+EOS) in some (shuffled) order: every complete document in it is
    # one of the inputs, each used once; the rest is accounted for by the cut and the dropped tail.
    stream = tokens.reshape(-1).tolist()
    cut = [i + 1 for i, t in enumerate(stream) if t == eos]
    pieces = [stream[a:b] for a, b in zip([0] + cut[:-1], cut)]
    tail = stream[cut[-1]:] if cut else stream
    pool = sorted(map(tuple, expected))
    found = sorted(map(tuple, pieces))
    for p in found:
        pool.remove(p)  # raises if a piece is not an input document (or is used twice)
    # what is left: the document cut by the end of the rows (it starts with the tail) and any
    # documents that fell entirely into the dropped tail
    assert sum(map(len, pool)) == len(tail) + meta["splits"]["train"]["dropped_tokens"]
    assert not tail or any(list(p[: len(tail)]) == tail for p in pool)

    # Document ids: 0 at every row start, +1 exactly after each EOS within a row, constant otherwise.
    for r in range(rows):
        assert docs[r, 0] == 0
        for c in range(1, L):
            step = docs[r, c] - docs[r, c - 1]
            assert step == (1 if tokens[r, c - 1] == eos else 0), (r, c)


@pytest.mark.unit
def test_blend_proportions_and_upsampling(tmp_path, tok):
    _, tok_dir = tok
    big = _write(tmp_path / "big.jsonl", _docs(300, seed=2, prefix="big "))
    small = _write(tmp_path / "small.jsonl", _docs(40, seed=3, prefix="small "))
    cfg = DataPrepConfig(kind="pretrain", sources=[f"{big}:1", f"{small}:3"], tokenizer=tok_dir, seq_len=64,
                         out=str(tmp_path / "out"), val_fraction=0.0, seed=7)
    meta = json.loads((prepare(cfg, log=None) / "meta.json").read_text())
    b, s = meta["sources"]
    share = s["train_tokens_sampled"] / (b["train_tokens_sampled"] + s["train_tokens_sampled"])
    assert share == pytest.approx(0.75, abs=0.02)
    assert s["train_documents_sampled"] > s["documents"]  # upsampled: documents repeated
    assert b["train_documents_sampled"] < b["documents"]  # downsampled
    # output size = all input tokens
    assert b["train_tokens_sampled"] + s["train_tokens_sampled"] == pytest.approx(b["tokens"] + s["tokens"], rel=0.02)

    # deterministic in the seed; another seed gives another order of the same blend
    cfg2 = DataPrepConfig(**{**cfg.__dict__, "out": str(tmp_path / "out2")})
    cfg3 = DataPrepConfig(**{**cfg.__dict__, "out": str(tmp_path / "out3"), "seed": 8})
    t1 = _load(prepare(cfg2, log=None), "train")[0]
    t0 = _load(tmp_path / "out", "train")[0]
    t3 = _load(prepare(cfg3, log=None), "train")[0]
    assert np.array_equal(t0, t1)
    assert t3.shape[0] == pytest.approx(t0.shape[0], abs=2) and not np.array_equal(t0[: len(t3)], t3[: len(t0)])


@pytest.mark.unit
def test_blend_function_hits_targets():
    rng = np.random.default_rng(0)
    lengths = [rng.integers(1, 50, 500), rng.integers(1, 50, 20), rng.integers(1, 50, 200)]
    idx = [np.arange(len(x)) for x in lengths]
    src, doc = blend(idx, lengths, [2.0, 1.0, 1.0], seed=0)
    tokens = np.array([sum(int(lengths[s][d]) for s, d in zip(src, doc) if s == k) for k in range(3)])
    assert tokens / tokens.sum() == pytest.approx([0.5, 0.25, 0.25], abs=0.01)
    src2, doc2 = blend(idx, lengths, [2.0, 1.0, 1.0], seed=0)
    assert np.array_equal(src, src2) and np.array_equal(doc, doc2)


@pytest.mark.unit
def test_holdout_is_by_content_hash():
    texts = [f"document number {i}" for i in range(2000)] + ["document number 5"]  # one duplicate
    keys = [np.array([doc_key(t.encode()) for t in texts], dtype=np.uint64)]
    lengths = [np.full(len(texts), 10)]
    train, val = holdout(keys, lengths, 0.1)
    assert len(val[0]) == pytest.approx(200, abs=45)
    assert (5 in val[0]) == (2000 in val[0])  # duplicates land on the same side
    assert holdout(keys, lengths, 0.1)[1][0].tolist() == val[0].tolist()
    # too small for the minimum: topped up from the smallest keys, never the last train doc
    _, val_small = holdout([keys[0][:3]], [lengths[0][:3]], 0.01, min_val_tokens=25, min_val_docs=1)
    assert len(val_small[0]) == 2
    train0, val0 = holdout(keys, lengths, 0.0, min_val_tokens=100)
    assert len(val0[0]) == 0 and len(train0[0]) == len(texts)


@pytest.mark.unit
def test_val_split_from_holdout_and_from_val_sources(tmp_path, tok):
    _, tok_dir = tok
    src = _write(tmp_path / "d.jsonl", _docs(200, seed=4))
    cfg = DataPrepConfig(kind="pretrain", sources=[src], tokenizer=tok_dir, seq_len=32, out=str(tmp_path / "a"),
                         val_fraction=0.05)
    meta = json.loads((prepare(cfg, log=None) / "meta.json").read_text())
    held = meta["sources"][0]["val_documents_held_out"]
    assert 1 <= held <= 25 and meta["splits"]["val"]["rows"] >= 1
    assert meta["sources"][0]["train_documents_sampled"] == 200 - held

    val = _write(tmp_path / "v.jsonl", _docs(30, seed=5))
    cfg = DataPrepConfig(kind="pretrain", sources=[src], val_sources=[val], tokenizer=tok_dir, seq_len=32,
                         out=str(tmp_path / "b"))
    meta = json.loads((prepare(cfg, log=None) / "meta.json").read_text())
    assert [s["role"] for s in meta["sources"]] == ["train", "val"]
    assert meta["sources"][0]["train_documents_sampled"] == 200
    assert meta["splits"]["val"]["tokens"] + meta["splits"]["val"]["dropped_tokens"] == meta["sources"][1]["tokens"]


@pytest.mark.unit
def test_num_proc_does_not_change_the_output(tmp_path, tok):
    _, tok_dir = tok
    src = _write(tmp_path / "d.jsonl", _docs(700, seed=6))
    common = dict(kind="pretrain", sources=[SourceSpec(src)], tokenizer=tok_dir, seq_len=48, max_documents=650)
    a = prepare(DataPrepConfig(**common, out=str(tmp_path / "p1"), num_proc=1), log=None)
    b = prepare(DataPrepConfig(**common, out=str(tmp_path / "p2"), num_proc=2), log=None)
    for split in ("train", "val"):
        for x, y in zip(_load(a, split), _load(b, split)):
            assert np.array_equal(x, y)
    ma, mb = (json.loads((p / "meta.json").read_text()) for p in (a, b))
    assert ma["fingerprint"] == mb["fingerprint"] and ma["sources"][0]["documents"] == 650
