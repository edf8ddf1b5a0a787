"""Train/val holdout and weighted blending of several sources, both deterministic.

Holdout (:func:`holdout`), used when no ``val_sources`` are given: a document goes to val when
its hash key (64-bit BLAKE2b of its text, or of its messages as canonical JSON; see
:func:`doc_key`) maps below ``val_fraction``, i.e. ``key / 2**64 < val_fraction``. This depends on
the content only, not on the seed or the order, so the val set is stable across re-preparations
and exact duplicates always land on the same side (no train/val leakage through duplicates).
If that leaves val smaller than ``min_val_tokens`` tokens / ``min_val_docs`` documents (tiny
corpora; pretraining asks for one full row), the train documents with the smallest keys are moved
over until it is not (but the last train document is never taken).

Blending (:func:`blend`): ``weight`` is the relative share of *tokens* a source gets in the
output. The output size is the total number of tokens of all train documents, ``N = sum T_s``;
source ``s`` contributes ``t_s = N * w_s / sum(w)`` tokens. A source asked for more than it has
(``t_s > T_s``) is *upsampled*: all of its documents are repeated ``floor(t_s / T_s)`` times and
the remainder is filled from a seeded random permutation of its documents; one asked for less is
subsampled from such a permutation. Whole documents are taken, so a share overshoots or
undershoots by less than one document (the count closest to the target is chosen). Finally all
selected documents (repeats included) are shuffled together with the seed, so the sources are
interleaved inside rows. With a single source this is just a seeded shuffle of its documents.

Val is never reweighted or repeated: it is every held-out document (or every document of the
``val_sources``) once, in source order. Repeating val documents would only count them twice.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["doc_key", "holdout", "blend"]

_TWO64 = float(2**64)


def doc_key(payload: bytes) -> int:
    """64-bit content hash of a document (its UTF-8 text or canonical JSON)."""
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


def holdout(
    keys: list[np.ndarray],
    lengths: list[np.ndarray],
    val_fraction: float,
    *,
    min_val_tokens: int = 0,
    min_val_docs: int = 0,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split every source's documents into train and val indices by content hash.

    Args:
        keys: per source, uint64 ``[n_s]`` document hash keys.
        lengths: per source, int ``[n_s]`` token counts.
        val_fraction: expected fraction of documents held out; 0 disables val (and the minimums).
    Returns:
        ``(train_idx, val_idx)``: per source, sorted int64 document indices.
    """
    fracs = [np.asarray(k, dtype=np.uint64).astype(np.float64) / _TWO64 for k in keys]
    is_val = [f < val_fraction for f in fracs]
    if val_fraction > 0:
        val_tokens = sum(int(np.asarray(ln)[v].sum()) for ln, v in zip(lengths, is_val))
        val_docs = sum(int(v.sum()) for v in is_val)
        if val_tokens < min_val_tokens or val_docs < min_val_docs:
            # candidates: remaining train docs, smallest key first (ties broken by source, index)
            cand_src = np.concatenate([np.full(int((~v).sum()), s) for s, v in enumerate(is_val)] or [np.zeros(0, int)])
            cand_doc = np.concatenate([np.nonzero(~v)[0] for v in is_val] or [np.zeros(0, int)])
            cand_frac = np.concatenate([f[~v] for f, v in zip(fracs, is_val)] or [np.zeros(0)])
            left = len(cand_doc)
            for j in np.lexsort((cand_doc, cand_src, cand_frac)):
                # stop when satisfied, and never take the last train document
                if (val_tokens >= min_val_tokens and val_docs >= min_val_docs) or left <= 1:
                    break
                left -= 1
                s, d = int(cand_src[j]), int(cand_doc[j])
                is_val[s][d] = True
                val_tokens += int(lengths[s][d])
                val_docs += 1
    train_idx = [np.nonzero(~v)[0].astype(np.int64) for v in is_val]
    val_idx = [np.nonzero(v)[0].astype(np.int64) for v in is_val]
    return train_idx, val_idx


def _take(rng: np.random.Generator, idx: np.ndarray, lengths: np.ndarray, target: float) -> np.ndarray:
    """Documents of one source (repeats allowed) whose token total is closest to ``target``."""
    total = float(lengths[idx].sum())
    if total == 0 or target <= 0:
        return np.zeros(0, dtype=np.int64)
    full = int(target // total)
    rest = target - full * total
    perm = idx[rng.permutation(len(idx))]
    cum = np.cumsum(lengths[perm])
    m = int(np.searchsorted(cum, rest, side="left"))  # first m with cum[m] >= rest, i.e. take m+1
    # choose between taking m and m+1 documents: whichever lands closer to the target
    below = float(cum[m - 1]) if m > 0 else 0.0
    above = float(cum[m]) if m < len(cum) else below
    n_rest = m + 1 if (m < len(cum) and above - rest < rest - below) else m
    return np.concatenate([np.tile(idx, full), perm[:n_rest]]).astype(np.int64)


def blend(
    train_idx: list[np.ndarray], lengths: list[np.ndarray], weights: list[float], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted, shuffled document order of the train split (see the module docstring).

    Returns:
        ``(src, doc)``: int64 ``[n_out]`` store index and document index of each output document.
    """
    lengths = [np.asarray(ln, dtype=np.int64) for ln in lengths]
    available = np.array([float(ln[idx].sum()) for ln, idx in zip(lengths, train_idx)])
    w = np.asarray(weights, dtype=np.float64)
    if np.any(available == 0):
        w = np.where(available == 0, 0.0, w)  # a source with no train document gets no share
    if w.sum() == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    targets = available.sum() * w / w.sum()
    rng = np.random.default_rng(seed)
    picked = [_take(rng, idx, ln, t) for idx, ln, t in zip(train_idx, lengths, targets)]
    src = np.concatenate([np.full(len(p), s, dtype=np.int64) for s, p in enumerate(picked)])
    doc = np.concatenate(picked)
    order = rng.permutation(len(doc))
    return src[order], doc[order]
