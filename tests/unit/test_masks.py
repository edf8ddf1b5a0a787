"""Attention patterns equal hand-written matrices; packed rows never cross documents."""

import pytest
import torch

from nemodiff_train.core.masks import PATTERNS, SequenceLayout, dense_mask, document_positions, flex_block_mask

pytestmark = pytest.mark.unit


def _m(rows):
    return torch.tensor([[c == "1" for c in r.replace(" ", "")] for r in rows])


TWO_STREAM_L4_B2 = _m(["1100 0000", "1100 0000", "0011 1100", "0011 1100",
                       "0000 1000", "0000 1100", "0000 1110", "0000 1111"])
BD3_L4_B2 = _m(["1100 0000", "1100 0000", "0011 1100", "0011 1100",
                "0000 1100", "0000 1100", "0000 1111", "0000 1111"])
BLOCK_CAUSAL_L4_B2 = _m(["1100", "1100", "1111", "1111"])
CAUSAL_L4 = _m(["1000", "1100", "1110", "1111"])
# packed: documents [0, 0 | 1, 1], B = 2: each document is a single block
TWO_STREAM_PACKED = _m(["1100 0000", "1100 0000", "0011 0000", "0011 0000",
                        "0000 1000", "0000 1100", "0000 0010", "0000 0011"])


@pytest.mark.parametrize("name,expected", [("two_stream", TWO_STREAM_L4_B2), ("bd3", BD3_L4_B2),
                                           ("block_causal", BLOCK_CAUSAL_L4_B2), ("causal", CAUSAL_L4),
                                           ("bidirectional", torch.ones(4, 4, dtype=torch.bool))])
def test_pattern_equals_hand_matrix(name, expected):
    got = dense_mask(name, SequenceLayout(4, 2))[0, 0]
    assert torch.equal(got, expected), f"{name}:\n{got.int()}"


def test_packed_two_stream_hand_matrix():
    layout = SequenceLayout(4, 2, torch.tensor([[0, 0, 1, 1]]))
    assert torch.equal(dense_mask("two_stream", layout)[0, 0], TWO_STREAM_PACKED)


def test_two_stream_b1_l3_is_fully_hand_written():
    # B = 1: a noisy token sees itself and all strictly earlier clean tokens
    expected = _m(["100 000", "010 100", "001 110", "000 100", "000 110", "000 111"])
    assert torch.equal(dense_mask("two_stream", SequenceLayout(3, 1))[0, 0], expected)


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("lengths,block", [((5, 3, 7), 2), ((4, 4, 4), 4), ((1, 9, 2), 3)])
def test_packed_row_is_block_diagonal_of_its_documents(name, lengths, block):
    """A packed row behaves exactly like its documents run one by one (blocks restart per document)."""
    pattern = PATTERNS[name]
    total = sum(lengths)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
    packed = dense_mask(name, SequenceLayout(total, block, doc_ids))[0, 0]
    s = pattern.streams

    def index(stream, pos):
        return stream * total + pos

    start = 0
    seen = torch.zeros_like(packed)
    for n in lengths:
        alone = dense_mask(name, SequenceLayout(n, block))[0, 0]
        for qs in range(s):
            for ks in range(s):
                q_idx = torch.tensor([index(qs, start + i) for i in range(n)])
                k_idx = torch.tensor([index(ks, start + i) for i in range(n)])
                sub = packed[q_idx][:, k_idx]
                assert torch.equal(sub, alone[qs * n:(qs + 1) * n, ks * n:(ks + 1) * n])
                seen[q_idx.unsqueeze(1), k_idx.unsqueeze(0)] = True
        start += n
    assert not packed[~seen].any(), "attention crosses a document boundary"


def test_document_positions_restart():
    doc = torch.tensor([[3, 3, 3, 7, 7, 3, 3]])
    assert document_positions(doc).tolist() == [[0, 1, 2, 0, 1, 0, 1]]


def test_flex_block_mask_agrees_with_dense():
    """The BlockMask builder gives the same attention as the dense builder (flex forward runs on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    docs = torch.tensor([[0] * 5 + [1] * 11, [0] * 16])
    layout = SequenceLayout(16, 4, docs)
    for name in ("two_stream", "bd3", "causal"):
        s = PATTERNS[name].streams * 16
        q, k, v = (torch.randn(2, 2, s, 8) for _ in range(3))
        dense = dense_mask(name, layout)
        block = flex_block_mask(name, layout, device="cpu", tile=8)
        out_flex = flex_attention(q, k, v, block_mask=block)
        out_dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        assert torch.allclose(out_flex, out_dense, atol=1e-5), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_block_mask_agrees_with_dense_cuda():
    from torch.nn.attention.flex_attention import flex_attention

    docs = torch.tensor([[0] * 100 + [1] * 156, [0] * 256]).cuda()
    layout = SequenceLayout(256, 64, docs)
    q, k, v = (torch.randn(2, 4, 512, 64, device="cuda") for _ in range(3))
    dense = dense_mask("two_stream", layout, device="cuda")
    block = flex_block_mask("two_stream", layout, device="cuda")
    out_flex = flex_attention(q, k, v, block_mask=block)
    out_dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    assert torch.allclose(out_flex, out_dense, atol=2e-3)
