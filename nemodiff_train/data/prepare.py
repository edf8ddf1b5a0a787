"""``prepare(cfg)``: turn raw sources into a prepared dataset directory (see ``format.py``).

Steps:

1. fingerprint the spec (:func:`fingerprint`); if ``<out>/meta.json`` already has that
   fingerprint, return at once (idempotent: a restarted job re-reads nothing); if it has another
   one, raise :class:`DataPrepError` rather than overwrite data a run may be using;
2. in ``<out>.tmp-<pid>``: tokenize every source once into an intermediate store
   (``ingest.py``), counting skipped rows per reason;
3. split train/val (``val_sources`` if given, else a hash holdout of ``val_fraction`` of the
   documents) and blend the train documents by weight (``blend.py``);
4. pack and write the ``train``/``val`` arrays (``pretrain.py`` / ``sft.py`` / ``packing.py``),
   delete the intermediate files, write ``meta.json``, and move the directory to ``<out>``.

The fingerprint is the sha256 of the canonical JSON of everything that determines the output:
format version, kind, sources and val sources (all fields but ``streaming``), tokenizer name and
a hash of its files (``tokenizer.tokenizer_digest``), seq_len, val_fraction, seed, max_chars,
max_documents, and for SFT ``pack`` and ``truncate``. It deliberately leaves out ``out`` and
``num_proc`` (same output for any parallelism) and the *contents* of the data files: editing a
source file in place is not detected; prepare into a new ``out`` after changing data.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .blend import blend, holdout
from .format import FORMAT_VERSION, META_FILE, SPLITS, atomic_dir, read_meta, write_meta
from .ingest import EncoderSpec, ingest_source
from .packing import write_split
from .report import SkipReport, report_lines, skip_phrase
from .sources import SourceSpec, resolve_files
from .tokenizer import TokenizerError, control_strings, load_tokenizer, special_ids, tokenizer_digest

__all__ = ["DataPrepConfig", "DataPrepError", "prepare", "fingerprint"]

KINDS = ("pretrain", "sft")
LOGGED_EXAMPLES = 5  # skipped-row examples printed; meta.json keeps up to report.MAX_EXAMPLES


class DataPrepError(RuntimeError):
    """Preparation cannot proceed (existing output from another spec, too little data, ...)."""


def _as_source(s) -> SourceSpec:
    if isinstance(s, SourceSpec):
        return s
    if isinstance(s, str):
        return SourceSpec.parse(s)
    if isinstance(s, dict):  # e.g. from YAML / Hydra
        d = dict(s)
        if "path" in d and "path_or_name" not in d:
            d["path_or_name"] = d.pop("path")
        return SourceSpec(**d)
    raise TypeError(f"cannot make a SourceSpec from {s!r}")


@dataclass
class DataPrepConfig:
    """What to prepare. ``sources`` may also be given as strings (``PATH[:WEIGHT]``) or dicts.

    Attributes:
        kind: ``"pretrain"`` (documents + EOS, packed and split across rows) or ``"sft"``
            (chat conversations, assistant-only loss).
        sources: train sources, blended by ``weight`` (share of tokens).
        val_sources: if non-empty, the val split is exactly these (``val_fraction`` unused);
            otherwise ``val_fraction`` of the train sources' documents is held out by hash.
        tokenizer: HF tokenizer directory or name.
        seq_len: L, the length of every row.
        out: output directory.
        val_fraction: expected fraction of documents held out for val (0 = no val rows).
        num_proc: tokenizer processes (does not change the output).
        seed: blend/shuffle seed.
        max_chars: rows with more characters are skipped as ``over-long-chars``.
        pack: SFT only: pack several conversations per row (else one per row, padded).
        truncate: SFT only: cut conversations longer than seq_len instead of skipping them.
        max_documents: read at most this many valid documents from *each* source (quick runs).
        max_bad_fraction: stop with an error when a source has more than this fraction of bad
            (skipped) rows; ``None`` = proceed on the good rows (a source with none still fails).
    """

    kind: str
    sources: list[SourceSpec]
    tokenizer: str
    seq_len: int
    out: str
    val_sources: list[SourceSpec] = field(default_factory=list)
    val_fraction: float = 0.01
    num_proc: int = 1
    seed: int = 0
    max_chars: int = 1_000_000
    pack: bool = True
    truncate: bool = False
    max_documents: int | None = None
    max_bad_fraction: float | None = None

    def __post_init__(self) -> None:
        self.sources = [_as_source(s) for s in (self.sources or [])]
        self.val_sources = [_as_source(s) for s in (self.val_sources or [])]
        self.tokenizer, self.out = str(self.tokenizer), str(self.out)
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not self.sources:
            raise ValueError("at least one source is needed")
        if int(self.seq_len) < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        self.seq_len = int(self.seq_len)
        if not (0.0 <= float(self.val_fraction) < 1.0):
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        self.val_fraction = float(self.val_fraction)
        if int(self.num_proc) < 1:
            raise ValueError(f"num_proc must be >= 1, got {self.num_proc}")
        if int(self.max_chars) < 1:
            raise ValueError(f"max_chars must be >= 1, got {self.max_chars}")
        if self.max_documents is not None and int(self.max_documents) < 1:
            raise ValueError(f"max_documents must be >= 1 or None, got {self.max_documents}")
        if self.max_bad_fraction is not None and not (0.0 <= float(self.max_bad_fraction) <= 1.0):
            raise ValueError(f"max_bad_fraction must be in [0, 1] or None, got {self.max_bad_fraction}")


def _spec_dict(s: SourceSpec) -> dict:
    d = asdict(s)
    d.pop("streaming")  # how it is read, not what is read
    if d.get("revision") is None:  # unpinned: the fingerprint of data prepared before revisions existed
        d.pop("revision", None)
    return d


def fingerprint(cfg: DataPrepConfig) -> str:
    """sha256 of the preparation spec (see the module docstring for what is included)."""
    spec = {
        "format_version": FORMAT_VERSION,
        "kind": cfg.kind,
        "sources": [_spec_dict(s) for s in cfg.sources],
        "val_sources": [_spec_dict(s) for s in cfg.val_sources],
        "tokenizer": cfg.tokenizer,
        "tokenizer_sha256": tokenizer_digest(cfg.tokenizer),
        "seq_len": cfg.seq_len,
        "val_fraction": cfg.val_fraction if not cfg.val_sources else None,
        "seed": cfg.seed,
        "max_chars": cfg.max_chars,
        "max_documents": cfg.max_documents,
    }
    if cfg.kind == "sft":
        # the packing algorithm is part of the spec: data packed by another one is another layout
        spec.update(pack="best_fit_decreasing" if cfg.pack else False, truncate=bool(cfg.truncate))
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _existing(out: Path, fp: str) -> dict | None:
    """The meta of an up-to-date ``out``; None if ``out`` is free; raise if it is in the way."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise DataPrepError(f"output {str(out)!r} exists and is not a directory")
    if not (out / META_FILE).is_file():
        if any(out.iterdir()):
            raise DataPrepError(
                f"output {str(out)!r} exists but is not a complete prepared dataset (no {META_FILE}); "
                "remove it or choose another output directory"
            )
        return None  # an empty directory: os.replace will take its place
    meta = read_meta(out)
    if meta.get("fingerprint") != fp:
        raise DataPrepError(
            f"output {str(out)!r} holds data prepared from a different spec (fingerprint "
            f"{str(meta.get('fingerprint'))[:12]}..., this spec {fp[:12]}...); refusing to overwrite it. "
            "Remove it or choose another output directory."
        )
    return meta


def prepare(cfg: DataPrepConfig, *, log: Callable[[str], None] | None = print) -> Path:
    """Prepare ``cfg`` into ``cfg.out`` (idempotent); return the output directory.

    ``log`` receives the progress lines and the final report (``None`` = silent).
    """
    log = log or (lambda _msg: None)
    out = Path(cfg.out)
    fp = fingerprint(cfg)
    meta = _existing(out, fp)
    if meta is not None:
        log(f"{out}: already prepared with this spec (fingerprint {fp[:12]}), nothing to do")
        return out

    for spec in list(cfg.sources) + list(cfg.val_sources):
        resolve_files(spec)  # a missing local file fails now, not after tokenizing the others
    tok = load_tokenizer(cfg.tokenizer)
    ids = special_ids(tok)
    if cfg.kind == "pretrain" and ids["eos_token_id"] is None:
        raise TokenizerError(f"tokenizer {cfg.tokenizer!r} has no eos_token; pretraining appends EOS to every document")
    if cfg.kind == "sft":
        if not getattr(tok, "chat_template", None):
            raise TokenizerError(f"tokenizer {cfg.tokenizer!r} has no chat_template; SFT data is rendered with it")
        if ids["pad_token_id"] is None:
            raise TokenizerError(f"tokenizer {cfg.tokenizer!r} has neither a pad nor an eos token to pad SFT rows with")
    encoder = EncoderSpec(cfg.kind, cfg.tokenizer, cfg.seq_len, truncate=cfg.truncate, tok=tok)
    controls = control_strings(tok) if cfg.kind == "sft" else []

    try:
        with atomic_dir(out) as tmp:
            meta = _build(cfg, tmp, encoder, controls, ids, fp, log)
    except OSError:
        # os.replace lost a race: another process finished the same preparation first.
        if (out / META_FILE).is_file() and read_meta(out).get("fingerprint") == fp:
            log(f"{out}: prepared concurrently by another process; using it")
            return out
        raise
    _log_report(out, meta, log)
    return out


def _build(cfg: DataPrepConfig, tmp: Path, encoder: EncoderSpec, controls: list[str], ids: dict, fp: str, log) -> dict:
    work = tmp / "_work"
    report = SkipReport()
    specs = list(cfg.sources) + list(cfg.val_sources)
    stores = []
    for i, spec in enumerate(specs):
        store, rep = ingest_source(
            spec,
            kind=cfg.kind,
            encoder=encoder,
            store_prefix=work / f"src{i}",
            max_chars=cfg.max_chars,
            max_documents=cfg.max_documents,
            num_proc=cfg.num_proc,
            control_strings=controls,
            max_bad_fraction=cfg.max_bad_fraction,
        )
        stores.append(store)
        report.merge(rep)
        dropped = skip_phrase(rep.counts, kind=cfg.kind, seq_len=cfg.seq_len, max_chars=cfg.max_chars)
        log(f"source {spec.label}: {store.n_docs} {'conversations' if cfg.kind == 'sft' else 'documents'}, "
            f"{store.n_tokens} tokens" + (f"; {dropped}" if dropped else ""))

    n_train = len(cfg.sources)
    lengths = [s.lengths for s in stores]
    if cfg.val_sources:
        train_idx = [np.arange(s.n_docs) for s in stores[:n_train]]
        val_idx = [np.zeros(0, np.int64)] * n_train + [np.arange(s.n_docs) for s in stores[n_train:]]
    else:
        train_idx, val_idx = holdout(
            [s.keys for s in stores],
            lengths,
            cfg.val_fraction,
            min_val_tokens=cfg.seq_len if cfg.kind == "pretrain" else 0,
            min_val_docs=1,
        )
    train_src, train_doc = blend(train_idx, lengths[:n_train], [s.weight for s in cfg.sources], cfg.seed)
    val_src = np.concatenate([np.full(len(v), s, dtype=np.int64) for s, v in enumerate(val_idx)])
    val_doc = np.concatenate(val_idx).astype(np.int64)

    def lengths_of(src: np.ndarray, doc: np.ndarray) -> np.ndarray:
        out = np.zeros(len(src), dtype=np.int64)
        for s, ln in enumerate(lengths):
            sel = src == s
            out[sel] = ln[doc[sel]]
        return out

    pad_id = ids["pad_token_id"] if ids["pad_token_id"] is not None else 0
    splits = {}
    for split, (src, doc) in zip(SPLITS, [(train_src, train_doc), (val_src, val_doc)]):
        doc_lengths = lengths_of(src, doc)
        if cfg.kind == "pretrain":
            from .pretrain import layout_continuous as make_layout
        else:
            from .sft import layout_packed, layout_padded

            make_layout = layout_packed if cfg.pack else layout_padded
        layout = make_layout(src, doc, doc_lengths, cfg.seq_len)
        splits[split] = write_split(tmp, split, layout, stores, cfg.seq_len, pad_id)
    if splits["train"]["rows"] == 0:
        raise DataPrepError(
            f"the train split has no rows: {int(lengths_of(train_src, train_doc).sum())} train "
            f"tokens do not fill one row of seq_len={cfg.seq_len}; add data or lower --seq-len"
        )

    sources_meta = []
    for i, (spec, store) in enumerate(zip(specs, stores)):
        is_train = i < n_train
        entry = {
            "name": spec.label,
            "path_or_name": spec.path_or_name,
            "weight": spec.weight if is_train else None,
            "role": "train" if is_train else "val",
            "documents": store.n_docs,
            "tokens": store.n_tokens,
        }
        if is_train:
            mine = train_src == i
            entry["train_documents_sampled"] = int(mine.sum())
            entry["train_tokens_sampled"] = int(lengths[i][train_doc[mine]].sum())
            entry["val_documents_held_out"] = int(len(val_idx[i]))
        sources_meta.append(entry)
    for store in stores:
        store.close()
    shutil.rmtree(work)

    meta = {
        "format_version": FORMAT_VERSION,
        "kind": cfg.kind,
        "seq_len": cfg.seq_len,
        "tokenizer": cfg.tokenizer,
        "vocab_size": ids["vocab_size"],
        "pad_token_id": ids["pad_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "splits": splits,
        "sources": sources_meta,
        "report": report.to_json(),
        "fingerprint": fp,
        "options": {
            "val_fraction": cfg.val_fraction,
            "seed": cfg.seed,
            "max_chars": cfg.max_chars,
            "max_documents": cfg.max_documents,
            **({"pack": cfg.pack, "truncate": cfg.truncate} if cfg.kind == "sft" else {}),
        },
    }
    write_meta(tmp, meta)
    return meta


def _log_report(out: Path, meta: dict, log) -> None:
    log(f"prepared {meta['kind']} data in {out} (seq_len {meta['seq_len']}, fingerprint {meta['fingerprint'][:12]})")
    for split, s in meta["splits"].items():
        extra = f", {s['dropped_tokens']} tail tokens dropped" if s["dropped_tokens"] else ""
        extra += f", {s['pad_tokens']} padding" if s["pad_tokens"] else ""
        log(
            f"  {split:5s}: {s['rows']} rows, {s['tokens']} tokens ({s['supervised_tokens']} supervised), "
            f"{s['documents']} documents{extra}"
        )
    if sum(s["role"] == "train" for s in meta["sources"]) > 1:
        train = meta["splits"]["train"]
        for s in meta["sources"]:
            if s["role"] == "train":
                share = s["train_tokens_sampled"] / max(1, train["tokens"] + train["dropped_tokens"])
                log(
                    f"  source {s['name']} (weight {s['weight']:g}): {s['documents']} docs, {s['tokens']} tokens"
                    f" -> {share:.1%} of train"
                )
    opts = meta.get("options", {})
    for line in report_lines(meta["report"], kind=meta["kind"], seq_len=meta["seq_len"],
                             max_chars=opts.get("max_chars"), meta_file=str(out / META_FILE),
                             examples=LOGGED_EXAMPLES):
        log("  " + line)
