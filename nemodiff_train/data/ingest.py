"""Read one source, check its rows, tokenize them (in parallel) and append them to a DocStore.

Flow per source: reader items (:class:`~nemodiff_train.data.readers.Row` /
:class:`~nemodiff_train.data.readers.Skip`, in file order) are grouped into batches; the
payloads of a batch are encoded by the worker's encoder (pretraining: token ids + EOS; SFT: ids +
assistant mask, or a skip reason); results come back in order and are appended to the store, and
skips are recorded in the source's :class:`~nemodiff_train.data.report.SkipReport` in that same
order. ``max_documents`` stops at exactly that many valid documents, so the store and the report
do not depend on ``num_proc``.

A source with no valid document raises :class:`~nemodiff_train.data.readers.SourceError` naming
the source and summarising why its rows were skipped.
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path
from typing import Iterator

from ..faults import fault_point
from .blend import doc_key
from .parallel import ordered_map
from .report import SkipReport
from .readers import Row, Skip, SourceError
from .sources import SourceSpec, iter_messages, iter_texts
from .store import DocStore

__all__ = ["EncoderSpec", "ingest_source"]

BATCH_SIZE = 256

# The encoder of this process: set by _init_worker (in pool workers, or in-process).
_ENCODER = None


class EncoderSpec:
    """Picklable recipe for an encoder: rebuilt in each worker from the tokenizer name."""

    def __init__(self, kind: str, tokenizer: str, seq_len: int, truncate: bool = False, tok=None) -> None:
        self.kind, self.tokenizer, self.seq_len, self.truncate = kind, tokenizer, seq_len, truncate
        self._tok = tok  # already loaded tokenizer, reused in-process and by forked workers

    def __getstate__(self):  # spawned workers load the tokenizer themselves
        return {**self.__dict__, "_tok": None}

    def build(self):
        from .tokenizer import load_tokenizer

        tok = self._tok if self._tok is not None else load_tokenizer(self.tokenizer)
        if self.kind == "pretrain":
            from .pretrain import PretrainEncoder

            return PretrainEncoder(tok)
        from .sft import SftEncoder

        return SftEncoder(tok, self.seq_len, truncate=self.truncate)


def _init_worker(spec: EncoderSpec) -> None:
    global _ENCODER
    _ENCODER = spec.build()


def _encode(payloads: list) -> list:
    return _ENCODER(payloads)


def _checked_items(spec: SourceSpec, kind: str, max_chars: int, control_strings: list[str]) -> Iterator[Row | Skip]:
    if kind == "pretrain":
        yield from iter_texts(spec, max_chars)
        return
    from .sft import check_conversation

    for item in iter_messages(spec, max_chars):
        if isinstance(item, Row):
            bad = check_conversation(item.value, control_strings)
            if bad is not None:
                yield Skip(item.where, *bad)
                continue
        yield item


def _batches(items: Iterator[Row | Skip]) -> Iterator[tuple[list[Row | Skip], list]]:
    """``(items, payloads of the Row items)`` in chunks of BATCH_SIZE items."""
    while True:
        chunk = list(islice(items, BATCH_SIZE))
        if not chunk:
            return
        yield chunk, [it.value for it in chunk if isinstance(it, Row)]


def _encode_batch(batch: tuple[list, list]) -> tuple[list, list]:
    items, payloads = batch
    return items, (_encode(payloads) if payloads else [])


def _key(kind: str, value) -> int:
    if kind == "pretrain":
        return doc_key(value.encode("utf-8", "surrogatepass"))
    return doc_key(json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass"))


def ingest_source(
    spec: SourceSpec,
    *,
    kind: str,
    encoder: EncoderSpec,
    store_prefix: str | Path,
    max_chars: int,
    max_documents: int | None,
    num_proc: int,
    control_strings: list[str] = (),
    max_bad_fraction: float | None = None,
) -> tuple[DocStore, SkipReport]:
    """Tokenize ``spec`` into a finished :class:`DocStore`; return it with the source's skips.

    ``max_bad_fraction``: raise :class:`SourceError` when more than this fraction of the source's
    rows (read up to ``max_documents``) was skipped (``None``: only a source with no valid row fails).
    """
    store = DocStore(store_prefix, with_mask=(kind == "sft"))
    report = SkipReport()
    items = _checked_items(spec, kind, max_chars, list(control_strings))
    results = ordered_map(_encode_batch, _batches(items), num_proc, initializer=_init_worker, initargs=(encoder,))
    try:
        done = False
        for batch_items, encoded in results:
            enc = iter(encoded)
            for item in batch_items:
                if isinstance(item, Skip):
                    report.skip(item.where, item.reason, item.detail)
                    continue
                res = next(enc)
                if isinstance(res, tuple) and isinstance(res[0], str):
                    report.skip(item.where, res[0], res[1])
                else:
                    ids, mask = res if isinstance(res, tuple) else (res, None)
                    store.append(ids, mask, _key(kind, item.value))
                    if max_documents is not None and store.n_docs >= max_documents:
                        done = True
                        break
            fault_point("data")  # NEMODIFF_FAULT=data:<n>: a fault mid-preparation
            if done:
                break
    finally:
        results.close()  # stops the worker pool early when max_documents was reached
        store.finish()
    bad = report.total / max(report.total + store.n_docs, 1)
    if store.n_docs and max_bad_fraction is not None and bad > max_bad_fraction:
        raise SourceError(
            f"source {spec.label!r}: {report.total} of {report.total + store.n_docs} rows ({bad:.1%}) were skipped, "
            f"over max_bad_fraction={max_bad_fraction} ({report.summary()}); first: "
            + "; ".join(report.examples[:3])
        )
    if store.n_docs == 0:
        raise SourceError(
            f"source {spec.label!r} yielded no valid {'document' if kind == 'pretrain' else 'conversation'}"
            f" ({report.total} rows skipped: {report.summary()}"
            + (f"; first: {report.examples[0]}" if report.examples else "")
            + ")"
        )
    return store, report
