"""Prepared data → Megatron indexed datasets (megatron-core's IndexedDatasetBuilder) → training samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nemodiff_train.data.format import FORMAT_VERSION, create_split_arrays, write_meta


def make_prepared(root, rows=(10, 3), seq_len=16, seed=0, sft=False):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    splits = {}
    for split, n in zip(("train", "val"), rows):
        arrs = create_split_arrays(root, split, n, seq_len)
        arrs["tokens"][:] = rng.integers(0, 150_000, (n, seq_len), dtype=np.uint32)  # ids above 2^16 survive
        docs = np.cumsum(rng.random((n, seq_len)) < 0.2, axis=1).astype(np.int32)
        arrs["docs"][:] = docs
        arrs["loss_mask"][:] = (rng.random((n, seq_len)) < 0.7) if sft else 1
        for a in arrs.values():
            a.flush()
        splits[split] = {"rows": n}
    write_meta(root, {"format_version": FORMAT_VERSION, "seq_len": seq_len, "splits": splits, "fingerprint": str(seed)})
    return root


def test_conversion_keeps_tokens_documents_and_loss_masks(tmp_path):
    from nemodiff_train.data.format import open_split_arrays
    from nemodiff_train.engines.megatron.data import RowsDataset, convert_prepared

    src = make_prepared(tmp_path / "prep", sft=True)
    prefixes = convert_prepared(src, tmp_path / "idx")
    assert set(prefixes) == {"train", "val"}
    for split, n in (("train", 10), ("val", 3)):
        ref = open_split_arrays(src, split, n, 16)
        rows = RowsDataset(prefixes[split])
        assert len(rows) == n and rows.seq_len == 16
        for i in range(n):
            tok, doc, mask = rows.row(i)
            assert np.array_equal(tok, ref["tokens"][i].astype(np.int64))
            assert np.array_equal(doc, ref["docs"][i]) and np.array_equal(mask, ref["loss_mask"][i])
    # megatron-core's own reader sees plain indexed datasets (one sequence of L tokens per row)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefixes["train"] + "_tokens")
    assert len(ds) == 10 and list(ds.sequence_lengths) == [16] * 10
    # idempotent: a second call reuses the marker
    before = (tmp_path / "idx" / "train_tokens.bin").stat().st_mtime_ns
    assert convert_prepared(src, tmp_path / "idx") == prefixes
    assert (tmp_path / "idx" / "train_tokens.bin").stat().st_mtime_ns == before


def test_samples_follow_the_torch_engine_order_and_carry_their_index(tmp_path):
    from nemodiff_train.engines.megatron.data import TwoStreamDataset, convert_prepared
    from nemodiff_train.data.order import GlobalOrder

    src = make_prepared(tmp_path / "prep")
    prefixes = convert_prepared(src, tmp_path / "idx")
    ds = TwoStreamDataset([prefixes["train"]], [1.0], num_samples=35, seed=3, stage_index=1, sample_offset=100)
    order = GlobalOrder(10, 3, 1)
    from nemodiff_train.data.packed import PackedDataset

    packed = PackedDataset(src, "train")
    for pos in (0, 7, 9, 10, 34):  # crosses epochs
        s = ds[pos]
        ref = packed[order.row(pos)]
        assert torch.equal(s["tokens"], torch.as_tensor(ref["input_ids"]).long())
        assert torch.equal(s["doc_ids"], torch.as_tensor(ref["doc_ids"]).long())
        assert torch.equal(s["loss_mask"], torch.as_tensor(ref["loss_mask"]).bool())
        assert int(s["sample_index"]) == 100 + pos and int(s["noise_seed"]) == 3


def test_blend_follows_the_weights(tmp_path):
    from nemodiff_train.engines.megatron.data import TwoStreamDataset, convert_prepared, parse_blend

    a = convert_prepared(make_prepared(tmp_path / "a", seed=1), tmp_path / "ia")["train"]
    b = convert_prepared(make_prepared(tmp_path / "b", seed=2), tmp_path / "ib")["train"]
    prefixes, weights = parse_blend(["3", a, "1", b])
    assert weights == [0.75, 0.25]
    ds = TwoStreamDataset(prefixes, weights, num_samples=400, seed=0, stage_index=0)
    which = [ds.locate(i)[0] for i in range(400)]
    assert abs(which.count(0) / 400 - 0.75) < 0.02
    assert ds[5]["tokens"].shape == (16,)
    with pytest.raises(ValueError):
        parse_blend(["1", a, "2"])


def test_provider_builds_train_and_valid(tmp_path):
    from megatron.bridge.data.base import DatasetBuildContext

    from nemodiff_train.engines.megatron.data import TwoStreamDatasetProvider, convert_prepared

    p = convert_prepared(make_prepared(tmp_path / "prep"), tmp_path / "idx")
    prov = TwoStreamDatasetProvider(seq_length=16, train_blend=[p["train"]], valid_blend=[p["val"]], seed=0,
                                    dataloader_type="single", num_workers=0)
    train, valid, test = prov.build_datasets(DatasetBuildContext(train_samples=40, valid_samples=6, test_samples=0))
    assert len(train) == 40 and len(valid) == 6 and test is None
    assert int(valid[0]["noise_seed"]) == 7919  # the torch engine's validation noise seed (run seed + 7919)
    with pytest.raises(ValueError, match="seq_len"):
        TwoStreamDatasetProvider(seq_length=32, train_blend=[p["train"]]).build_datasets(
            DatasetBuildContext(train_samples=4, valid_samples=0, test_samples=0))
