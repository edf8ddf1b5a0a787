"""Prepared data (``nemodiff_train.data`` format) → Megatron indexed datasets, blends, dataset provider.

A prepared split is three ``[rows, L]`` arrays (tokens, document ids, loss mask). Each becomes a
Megatron indexed dataset (``.bin`` + ``.idx``, written with megatron-core's own
``IndexedDatasetBuilder``), one sequence of L items per row, under one prefix::

    <prefix>_tokens.{bin,idx}      int32   token ids
    <prefix>_docs.{bin,idx}        int32   document id per token (packing boundaries)
    <prefix>_loss_mask.{bin,idx}   uint8   1 = supervised (SFT prompts are 0)

So SFT loss masks and packing boundaries travel as two extra indexed datasets aligned row for row
with the tokens. Megatron's ``GPTDataset`` is not used: it re-windows token streams and would drop
both. :class:`TwoStreamDataset` reads rows instead, in the same global order as the torch engine
(:class:`~nemodiff_train.data.order.GlobalOrder`: per-epoch seeded permutations), and
tags every sample with its global index, which seeds its noise. Blends of several converted
prefixes (``weight, prefix, weight, prefix ...`` like Megatron's ``--data-path``) are interleaved
with megatron-core's ``build_blending_indices``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.bridge.data.base import DatasetBuildContext, DatasetProvider
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from ...data.format import open_split_arrays, read_meta
from ...models.step import VALIDATION_SEED_OFFSET

log = logging.getLogger(__name__)

__all__ = ["ARRAYS", "convert_prepared", "RowsDataset", "TwoStreamDataset", "TwoStreamDatasetProvider",
           "parse_blend"]

ARRAYS: dict[str, tuple[str, type]] = {  # prepared array name -> (indexed dataset suffix, dtype)
    "tokens": ("tokens", np.int32),
    "docs": ("docs", np.int32),
    "loss_mask": ("loss_mask", np.uint8),
}
CHUNK_ROWS = 4096
MARKER = "megatron_indexed.json"


def convert_prepared(prepared_dir: str | Path, out_dir: str | Path) -> dict[str, str | None]:
    """Convert every split of a prepared dataset; returns ``{split: prefix or None (no rows)}``.

    Idempotent: a directory with a complete ``megatron_indexed.json`` for the same source is reused.
    """
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    meta = read_meta(prepared_dir)
    marker = out_dir / MARKER
    source_id = {"source": str(prepared_dir.resolve()), "fingerprint": meta.get("fingerprint"),
                 "splits": meta.get("splits")}
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("source_id") == source_id:
            return done["prefixes"]
    out_dir.mkdir(parents=True, exist_ok=True)
    seq_len = int(meta["seq_len"])
    prefixes: dict[str, str | None] = {}
    for split, info in meta.get("splits", {}).items():
        rows = int(info["rows"])
        if rows == 0:
            prefixes[split] = None
            continue
        arrays = open_split_arrays(prepared_dir, split, rows, seq_len)
        prefix = str(out_dir / split)
        for name, (suffix, dtype) in ARRAYS.items():
            builder = IndexedDatasetBuilder(f"{prefix}_{suffix}.bin", dtype=dtype)
            src = arrays[name]
            for start in range(0, rows, CHUNK_ROWS):
                block = np.asarray(src[start:start + CHUNK_ROWS], dtype=dtype)
                builder.add_document(block.reshape(-1), [seq_len] * block.shape[0])
            builder.finalize(f"{prefix}_{suffix}.idx")
        prefixes[split] = prefix
        log.info("converted %s/%s: %d rows of %d tokens -> %s_*", prepared_dir, split, rows, seq_len, prefix)
    marker.write_text(json.dumps({"source_id": source_id, "prefixes": prefixes, "seq_len": seq_len}, indent=1))
    return prefixes


def parse_blend(items: list[str]) -> tuple[list[str], list[float]]:
    """``["0.7", "/p/a", "0.3", "/p/b"]`` or ``["/p/a"]`` → (prefixes, normalised weights)."""
    if len(items) == 1:
        return [items[0]], [1.0]
    if len(items) % 2:
        raise ValueError(f"a blend is `weight prefix weight prefix ...`; got {len(items)} items: {items}")
    weights = [float(w) for w in items[0::2]]
    prefixes = list(items[1::2])
    if any(w <= 0 for w in weights):
        raise ValueError(f"blend weights must be > 0, got {weights}")
    total = sum(weights)
    return prefixes, [w / total for w in weights]


class RowsDataset:
    """One converted split: ``row(i) -> (tokens, doc_ids, loss_mask)`` numpy arrays of length L."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.parts = {name: IndexedDataset(f"{prefix}_{suffix}", mmap=True) for name, (suffix, _) in ARRAYS.items()}
        n = {name: len(ds) for name, ds in self.parts.items()}
        if len(set(n.values())) != 1:
            raise ValueError(f"{prefix}: tokens/docs/loss_mask have different row counts {n}")
        self.rows = n["tokens"]
        self.seq_len = int(self.parts["tokens"].sequence_lengths[0]) if self.rows else 0

    def __len__(self) -> int:
        return self.rows

    def row(self, i: int):
        return tuple(self.parts[name][i] for name in ARRAYS)


class TwoStreamDataset(torch.utils.data.Dataset):
    """Global-order samples for the forward step.

    ``dataset[position]`` → ``tokens`` / ``doc_ids`` int64 ``[L]``, ``loss_mask`` bool ``[L]``,
    ``sample_index`` (= ``sample_offset + position``, the noise seed index; the torch engine uses the
    same) and ``noise_seed``.

    Args:
        prefixes, weights: converted splits and blend weights (one prefix: weight 1).
        num_samples: length (Megatron asks for train_iters × global batch).
        seed, stage_index: seed the per-epoch row permutations (as the torch engine).
        sample_offset: samples consumed by earlier stages.
        noise_seed: the run seed (validation uses a different one).
    """

    def __init__(self, prefixes: list[str], weights: list[float], num_samples: int, *, seed: int, stage_index: int,
                 sample_offset: int = 0, noise_seed: int | None = None, shuffle: bool = True):
        from ...data.order import GlobalOrder

        self.parts = [RowsDataset(p) for p in prefixes]
        if any(len(p) == 0 for p in self.parts):
            raise ValueError(f"empty dataset among {prefixes}")
        self.num_samples = int(num_samples)
        self.sample_offset = int(sample_offset)
        self.noise_seed = seed if noise_seed is None else noise_seed
        self.shuffle = shuffle
        self.orders = [GlobalOrder(len(p), seed + 7_777 * k, stage_index) for k, p in enumerate(self.parts)]
        if len(self.parts) == 1:
            self.which = None
        else:
            from megatron.core.datasets import helpers

            which = np.zeros(self.num_samples, dtype=np.int16)
            within = np.zeros(self.num_samples, dtype=np.int64)
            helpers.build_blending_indices(which, within, np.asarray(weights, dtype=np.float64), len(self.parts),
                                           self.num_samples, False)
            self.which, self.within = which, within

    def __len__(self) -> int:
        return self.num_samples

    def locate(self, position: int) -> tuple[int, int]:
        """(component, row) of a global position."""
        k, p = (0, position) if self.which is None else (int(self.which[position]), int(self.within[position]))
        row = self.orders[k].row(p) if self.shuffle else p % len(self.parts[k])
        return k, row

    def __getitem__(self, position: int) -> dict[str, Any]:
        position = int(position)
        k, row = self.locate(position)
        tokens, docs, mask = self.parts[k].row(row)
        return {"tokens": torch.from_numpy(tokens.astype(np.int64)),
                "doc_ids": torch.from_numpy(docs.astype(np.int64)),
                "loss_mask": torch.from_numpy(mask.astype(np.bool_)),
                "sample_index": torch.tensor(self.sample_offset + position, dtype=torch.int64),
                "noise_seed": torch.tensor(self.noise_seed, dtype=torch.int64)}


@dataclass(kw_only=True)
class TwoStreamDatasetProvider(DatasetProvider):
    """Megatron-Bridge dataset provider (``ConfigContainer.dataset``) over converted splits.

    ``train_blend`` / ``valid_blend`` use :func:`parse_blend`'s format. Serialisable (plain fields).
    """

    seq_length: int
    train_blend: list[str] = field(default_factory=list)
    valid_blend: list[str] = field(default_factory=list)
    seed: int = 0
    stage_index: int = 0
    sample_offset: int = 0
    valid_noise_seed: int = VALIDATION_SEED_OFFSET  # the torch engine's validation noise

    def build_datasets(self, context: DatasetBuildContext):
        prefixes, weights = parse_blend(self.train_blend)
        train = TwoStreamDataset(prefixes, weights, context.train_samples, seed=self.seed,
                                 stage_index=self.stage_index, sample_offset=self.sample_offset)
        if train.parts[0].seq_len != self.seq_length:
            raise ValueError(f"data rows have {train.parts[0].seq_len} tokens, the stage says seq_len="
                             f"{self.seq_length}")
        valid = None
        if self.valid_blend and context.valid_samples > 0:
            vp, vw = parse_blend(self.valid_blend)
            valid = TwoStreamDataset(vp, vw, context.valid_samples, seed=self.seed, stage_index=self.stage_index,
                                     noise_seed=self.seed + self.valid_noise_seed, shuffle=False)
        return train, valid, None
