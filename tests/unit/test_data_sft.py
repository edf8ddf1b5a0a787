"""SFT preparation: assistant-only loss mask (template tags and prefix fallback), checks, layouts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nemodiff_train.data import DataPrepConfig, PackedDataset, prepare
from nemodiff_train.data.sft import SftEncoder, check_conversation, has_generation_tags, layout_packed
from nemodiff_train.data.tokenizer import control_strings
from tests.helpers.tiny_tokenizer import make_tiny_tokenizer

pytestmark = pytest.mark.unit

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi! How are you?"},
    {"role": "user", "content": "fine, and you?"},
    {"role": "assistant", "content": "The quick brown fox."},
]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """{"tags": (tokenizer, dir), "plain": (tokenizer, dir)}: with / without generation tags."""
    out = {}
    for name, tags in (("tags", True), ("plain", False)):
        d = tmp_path_factory.mktemp(f"tok_{name}")
        out[name] = (make_tiny_tokenizer(d, generation_tags=tags), str(d))
    return out


def _spans(tok, ids, mask):
    """Decoded text of each maximal run of mask == 1."""
    spans, cur = [], []
    for i, m in zip(list(ids) + [0], list(mask) + [0]):
        if m:
            cur.append(int(i))
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    return spans


@pytest.mark.unit
@pytest.mark.parametrize(
    "variant, expected",
    [
        ("tags", ["Hi! How are you?<|im_end|>", "The quick brown fox.<|im_end|>"]),
        # the prefix-diff fallback also covers what the template writes after the end marker
        ("plain", ["Hi! How are you?<|im_end|>\n", "The quick brown fox.<|im_end|>\n"]),
    ],
)
def test_loss_mask_is_exactly_the_assistant_tokens(toks, variant, expected):
    tok, _ = toks[variant]
    assert has_generation_tags(tok) == (variant == "tags")
    enc = SftEncoder(tok, seq_len=512)
    ids, mask = enc.encode(CONV)
    full = tok.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]
    assert ids.tolist() == list(full)  # the rendering itself is the template's
    assert _spans(tok, ids, mask) == expected
    # prompt tokens: everything else, including the assistant headers, is 0
    n_expected = sum(len(tok(s, add_special_tokens=False)["input_ids"]) for s in expected)
    assert int(mask.sum()) == n_expected


@pytest.mark.unit
def test_both_paths_agree_on_the_assistant_content(toks):
    tok, _ = toks["tags"]
    a_ids, a_mask = SftEncoder(tok, 512, use_generation_tags=True).encode(CONV)
    b_ids, b_mask = SftEncoder(tok, 512, use_generation_tags=False).encode(CONV)
    assert a_ids.tolist() == b_ids.tolist()
    assert np.all(b_mask >= a_mask)  # fallback marks a superset (the trailing "\n")
    assert [s.rstrip("\n") for s in _spans(tok, b_ids, b_mask)] == _spans(tok, a_ids, a_mask)


@pytest.mark.unit
def test_conversation_checks(toks):
    tok, _ = toks["tags"]
    u, a, s = ({"role": r, "content": "x"} for r in ("user", "assistant", "system"))
    ctl = control_strings(tok)
    assert "<|im_end|>" in ctl
    cases = [
        ([u, a], None),
        ([s, u, a, u, a], None),
        ([], "bad-messages"),
        ([u, {"role": "assistant"}], "bad-messages"),
        ([u, {"role": "assistant", "content": 3}], "bad-messages"),
        ([u, {"role": "tool", "content": "x"}], "bad-role"),
        ([a, u], "bad-order"),
        ([u, u, a], "bad-order"),
        ([u, a, s, u, a], "bad-order"),
        ([u, a, u], "bad-order"),
        ([s], "bad-order"),
        ([u, {"role": "assistant", "content": "  "}], "no-assistant-tokens"),
        ([{"role": "user", "content": "inject <|im_end|> here"}, a], "special-token-in-content"),
    ]
    for messages, reason in cases:
        got = check_conversation(messages, ctl)
        assert (got[0] if got else None) == reason, messages


@pytest.mark.unit
def test_over_long_rows_skip_or_truncate(toks):
    tok, _ = toks["tags"]
    n = len(SftEncoder(tok, 10_000).encode(CONV)[0])
    assert SftEncoder(tok, n - 1).encode(CONV)[0] == "over-long-tokens"
    ids, mask = SftEncoder(tok, n - 1, truncate=True).encode(CONV)
    assert len(ids) == n - 1 and mask.any()
    # truncated before any assistant token: nothing to learn, skipped anyway
    assert SftEncoder(tok, 5, truncate=True).encode(CONV)[0] == "over-long-tokens"


@pytest.mark.unit
def test_template_that_rewrites_earlier_turns_is_a_mismatch(toks):
    tok, d = toks["plain"]
    tok2 = make_tiny_tokenizer(generation_tags=False)
    tok2.chat_template = "{{ messages | length }}" + tok.chat_template  # prefix depends on the whole
    assert SftEncoder(tok2, 512).encode(CONV)[0] == "template-mismatch"


@pytest.mark.unit
def test_layout_packed_best_fit_decreasing():
    # longest first, each into the fullest row that still fits: [8] [5 3] [4 1] (next-fit needed 4 rows)
    lay = layout_packed(np.zeros(5), np.arange(5), np.array([4, 3, 5, 8, 1]), 8)
    assert lay.rows == 3
    assert lay.doc.tolist() == [3, 2, 1, 0, 4]
    assert lay.row.tolist() == [0, 1, 1, 2, 2] and lay.col.tolist() == [0, 0, 5, 0, 4]
    assert lay.length.tolist() == [8, 5, 3, 4, 1]
    with pytest.raises(ValueError, match="does not fit"):
        layout_packed(np.zeros(1), np.arange(1), np.array([9]), 8)


@pytest.mark.unit
def test_layout_packed_places_every_conversation_once_without_overlap():
    rng = np.random.default_rng(0)
    for seq_len in (8, 64, 256):
        lengths = rng.integers(1, seq_len + 1, 500)
        src = rng.integers(0, 3, 500)
        lay = layout_packed(src, np.arange(500), lengths, seq_len)
        assert sorted(lay.doc.tolist()) == list(range(500))
        assert (lay.src == src[lay.doc]).all() and (lay.length == lengths[lay.doc]).all()
        keys = lay.row * (seq_len + 1) + lay.col
        assert (np.diff(keys) > 0).all()  # sorted by (row, col)
        for r in range(lay.rows):  # contiguous from column 0, never past the row
            mine = lay.row == r
            ends = np.cumsum(lay.length[mine])
            assert lay.col[mine].tolist() == [0, *ends[:-1].tolist()] and ends[-1] <= seq_len
        # best fit never opens a row while an open one could take the conversation: at most one row
        # is at most half full, so rows < 2 * tokens / seq_len + 1
        assert lay.rows <= 2 * lengths.sum() / seq_len + 1
        assert lay.rows >= int(np.ceil(lengths.sum() / seq_len))


def _write_chats(path, n=24):
    rows = []
    for i in range(n):
        rows.append({"messages": [
            {"role": "user", "content": f"question {i}: " + "fox " * (i % 5)},
            {"role": "assistant", "content": f"answer {i} " + "dog " * (i % 7)},
        ]})
    rows.append({"messages": [{"role": "assistant", "content": "no user first"}]})
    rows.append({"conversation": []})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.unit
@pytest.mark.parametrize("pack", [True, False])
def test_prepared_sft_rows(tmp_path, toks, pack):
    tok, tok_dir = toks["tags"]
    src = _write_chats(tmp_path / "chat.jsonl")
    out = prepare(DataPrepConfig(kind="sft", sources=[src], tokenizer=tok_dir, seq_len=96, out=str(tmp_path / "o"),
                                 val_fraction=0.1, pack=pack), log=None)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["report"]["skipped"] == {"bad-order": 1, "missing-field": 1}
    assert meta["pad_token_id"] == tok.pad_token_id
    docs_total = 0
    for split in ("train", "val"):
        ds = PackedDataset(out, split)
        docs_total += meta["splits"][split]["documents"]
        n_sup = 0
        for i in range(len(ds)):
            row = ds[i]
            ids, doc_ids, mask = row["input_ids"], row["doc_ids"], row["loss_mask"]
            is_pad = ids == tok.pad_token_id
            assert not mask[is_pad].any()
            n_pad = int(is_pad.sum())
            if n_pad:  # padding is the tail of the row and has its own document id
                assert is_pad[-n_pad:].all() and len(set(doc_ids[-n_pad:].tolist())) == 1
                assert doc_ids[-n_pad] == doc_ids[: len(ids) - n_pad].max() + 1
            n_convs = len(set(doc_ids[: len(ids) - n_pad].tolist()))
            assert n_convs >= 1 and (pack or n_convs == 1)
            # each conversation starts with <|im_start|> and its supervised tokens decode to answers
            for d in set(doc_ids[: len(ids) - n_pad].tolist()):
                sel = doc_ids == d
                assert tok.convert_ids_to_tokens(int(ids[sel][0])) == "<|im_start|>"
                spans = _spans(tok, ids[sel].tolist(), mask[sel].tolist())
                assert len(spans) == 1 and spans[0].startswith("answer ") and spans[0].endswith("<|im_end|>")
            n_sup += int(mask.sum())
        assert n_sup == meta["splits"][split]["supervised_tokens"]
        if not pack:
            assert len(ds) == meta["splits"][split]["documents"]
    assert docs_total == 24
    if pack:
        assert meta["splits"]["train"]["rows"] < meta["splits"]["train"]["documents"]
