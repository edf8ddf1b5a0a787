"""Generate a distill set: a teacher's answers to a stage's prompts, written resumably in chunks.

:func:`generate_distill_set` reads the prompts (:mod:`.distill_prompts`), renders each with the
tokenizer's chat template and ``add_generation_prompt=True`` (the very call the ``sft`` kind uses
for the prompt part of a row), and lets the teacher answer with the toolkit's batched AR decoder
(:func:`nemodiff_train.decoding.ar.ar_generate`), greedy (``temperature=0``) or sampled, until a stop
token. An answer that reaches ``max_new_tokens`` without one was cut mid-way: it is left out and
counted. Prompt ``n`` (0-based, per source) samples with seed ``seed + n`` whatever the batching.

Layout of the output directory::

    spec.json                          the fingerprint and what it covers (written first)
    chunks/src<i>/chunk_<k>.json       one committed batch of source i: its prompts' places, the
                                       kept rows, the cut and skipped counts (atomic rename)
    rows/src<i>.jsonl                  source i's rows, {"messages": prompt turns + the answer,
                                       "where", "response_tokens"}: an ``sft`` source
    meta.json                          counts and timing; written last: the set is complete

Resumable: a killed generation leaves committed chunks (and at most one temporary file); the next
call with the same spec checks that the prompts read again are the ones each chunk recorded and
generates from the first missing chunk, so the finished set equals an uninterrupted one.

Fingerprint: sha256 of the teacher's identity (given by the caller: model path and a weights or
config hash), the prompt sources (spec fields and a sha256 of local files' contents), the decoding
settings, the stop ids and the tokenizer. A directory holding another fingerprint is refused, never
overwritten or mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .. import faults
from .distill_prompts import DistillError, Prompt, iter_prompts
from .readers import Skip
from .sources import SourceSpec, resolve_files

__all__ = ["DistillSettings", "DistillSet", "DistillError", "generate_distill_set", "distill_fingerprint",
           "TEACHERS", "PROMPT_OVER_LONG"]

VERSION = 1
TEACHERS = ("base", "current")
PROMPT_OVER_LONG = "prompt-over-long-tokens"  # the prompt alone leaves no room for an answer in seq_len
SPEC_FILE, META_FILE = "spec.json", "meta.json"


@dataclass
class DistillSettings:
    """How the teacher answers (``data.distill`` of a stage; docs/distill.md).

    Attributes:
        teacher: ``base`` (the untouched ``model.path``) or ``current`` (the model being trained).
        prompt_field: a text column holding the prompt; None = chat rows' turns up to the last user turn.
        max_new_tokens: answer length cap; answers that reach it without a stop token are left out.
        temperature, top_p: 0 = greedy; > 0 samples (top-p filtered).
        seed: prompt n samples with ``seed + n``.
        batch_size: prompts per decoder batch and per committed chunk.
        max_prompts: read at most this many valid prompts per source (None = all).
        max_prompt_tokens: prompts longer than this are skipped (the stage sets ``seq_len - 1``).
        max_chars: rows with more characters are skipped (as in data preparation).
    """

    teacher: str = "base"
    prompt_field: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 32
    max_prompts: int | None = None
    max_prompt_tokens: int | None = None
    max_chars: int = 1_000_000

    def __post_init__(self) -> None:
        if self.teacher not in TEACHERS:
            raise DistillError(f"teacher {self.teacher!r} is not one of {list(TEACHERS)}")
        for name, low in (("max_new_tokens", 1), ("batch_size", 1), ("seed", 0), ("max_chars", 1)):
            if int(getattr(self, name)) < low:
                raise DistillError(f"{name} must be >= {low}, got {getattr(self, name)}")
        for name in ("max_prompts", "max_prompt_tokens"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise DistillError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        if not float(self.temperature) >= 0:
            raise DistillError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < float(self.top_p) <= 1:
            raise DistillError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class DistillSet:
    """A complete distill set: its directory, fingerprint, one rows file per prompt source, ``meta.json``."""

    dir: Path
    fingerprint: str
    files: list[Path]
    meta: dict = field(repr=False)


# ---------------------------------------------------------------------------------- fingerprint


def _file_digest(path: Path, h=None):
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            h.update(block)
    return h


def _source_identity(spec: SourceSpec) -> dict:
    """A prompt source's spec fields and, for local files, a sha256 of their names and contents."""
    d = asdict(spec)
    d.pop("streaming")
    files = resolve_files(spec)
    if files is not None:
        h = hashlib.sha256()
        for f in files:
            h.update(str(f).encode() + b"\0")
            _file_digest(f, h)
        d["files_sha256"] = h.hexdigest()
    return d


def tokenizer_identity(tokenizer) -> str:
    """sha256 of a tokenizer directory's files, or of a loaded tokenizer's vocabulary, template and specials."""
    from .tokenizer import tokenizer_digest

    if isinstance(tokenizer, (str, Path)):
        return tokenizer_digest(str(tokenizer))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())),
             str(getattr(tokenizer, "chat_template", None)), json.dumps(tokenizer.special_tokens_map, sort_keys=True,
                                                                        default=str)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def distill_fingerprint(specs: list[SourceSpec], teacher_identity: dict, tokenizer_sha256: str,
                        stop_ids: tuple[int, ...], settings: DistillSettings) -> tuple[str, dict]:
    """``(sha256, the spec it hashes)`` of a distill set (module docstring)."""
    spec = {"distill_version": VERSION, "teacher": teacher_identity, "prompts": [_source_identity(s) for s in specs],
            "tokenizer_sha256": tokenizer_sha256, "stop_ids": [int(t) for t in stop_ids], "settings": asdict(settings)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest(), spec


def _atomic_json(path: Path, obj: Any, *, lines: bool = False) -> None:
    """Write ``obj`` (or, with ``lines``, each item of it as one JSON line) to ``path`` atomically."""
    tmp = path.parent / f".{path.name}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        if lines:
            f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in obj)
        else:
            json.dump(obj, f, ensure_ascii=False, indent=1)
        f.flush()
        os.fsync(f.fileno())
    faults.fault_point("distill")  # written but not committed: a kill here must cost only this chunk
    os.replace(tmp, path)


def _check_existing(out: Path, fp: str) -> dict | None:
    """The meta of a complete set with fingerprint ``fp``; None when generation should (re)start; else raise."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise DistillError(f"distill set {str(out)!r} exists and is not a directory")
    spec_path = out / SPEC_FILE
    if not spec_path.is_file():
        if any(out.iterdir()):
            raise DistillError(f"{str(out)!r} exists but is not a distill set (no {SPEC_FILE}); remove it or "
                               "choose another data.prepared_dir")
        return None
    have = json.loads(spec_path.read_text(encoding="utf-8")).get("fingerprint")
    if have != fp:
        raise DistillError(
            f"distill set {str(out)!r} was generated from a different spec (fingerprint {str(have)[:12]}..., this "
            f"spec {fp[:12]}...: another teacher, prompts, decoding settings or tokenizer); refusing to overwrite "
            "or mix it. Remove it (and the stage's prepared data beside it) or choose another data.prepared_dir.")
    meta_path = out / META_FILE
    return json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else None


# ------------------------------------------------------------------------------------ generation


@dataclass
class _Batch:
    """Prompt batch ``index`` of one source: its prompts (with their ids) and the rows skipped while reading it."""

    index: int
    first: int  # the 0-based number of its first prompt within the source
    prompts: list[tuple[Prompt, list[int]]]
    skips: list[Skip]


def _batches(spec: SourceSpec, tok, settings: DistillSettings, controls: list[str]) -> Iterator[_Batch]:
    """Valid, tokenized prompts of ``spec`` in ``batch_size`` groups (the last may be shorter)."""
    prompts, skips, index, seen = [], [], 0, 0
    for item in iter_prompts(spec, settings.prompt_field, settings.max_chars, controls):
        if isinstance(item, Skip):
            skips.append(item)
            continue
        # the prompt part of an sft row is rendered with exactly this call (data/sft.py)
        ids = list(tok.apply_chat_template(item.messages, tokenize=True, return_dict=True,
                                           add_generation_prompt=True)["input_ids"])
        if settings.max_prompt_tokens is not None and len(ids) > settings.max_prompt_tokens:
            skips.append(Skip(item.where, PROMPT_OVER_LONG, f"{len(ids)} > {settings.max_prompt_tokens}"))
            continue
        prompts.append((item, ids))
        seen += 1
        if len(prompts) == settings.batch_size:
            yield _Batch(index, seen - len(prompts), prompts, skips)
            prompts, skips, index = [], [], index + 1
        if settings.max_prompts is not None and seen >= settings.max_prompts:
            break
    if prompts or skips:
        yield _Batch(index, seen - len(prompts), prompts, skips)


def _answer(batch: _Batch, lm, tok, stop_ids: tuple[int, ...], settings: DistillSettings, source: int) -> dict:
    """Decode one batch; the chunk record (kept rows, cut and skipped counts)."""
    from ..decoding.ar import ar_generate
    from ..decoding.config import DecodeConfig

    rows, cut, tokens, exact = [], [], 0, 0
    if batch.prompts:
        # prompt n of source i samples with seed + i * 2**32 + n: the same draws whatever the batching
        cfg = DecodeConfig(max_new_tokens=settings.max_new_tokens, temperature=float(settings.temperature),
                           top_p=float(settings.top_p), eos_token_ids=tuple(stop_ids),
                           seed=settings.seed + (source << 32) + batch.first)
        results = ar_generate(lm, [ids for _, ids in batch.prompts], cfg)
        for (prompt, _), res in zip(batch.prompts, results):
            tokens += len(res.tokens)
            if res.stats.finished_by != "eos":
                cut.append(prompt.where)
                continue
            answer = list(res.tokens[:-1])  # the stop token is the template's turn end, not content
            text = tok.decode(answer, skip_special_tokens=False)
            exact += list(tok.encode(text, add_special_tokens=False)) == answer
            rows.append({"messages": prompt.messages + [{"role": "assistant", "content": text}],
                         "where": prompt.where, "response_tokens": answer, "stop_token": int(res.tokens[-1])})
    return {"wheres": [p.where for p, _ in batch.prompts], "rows": rows, "cut": cut, "generated_tokens": tokens,
            "retokenized_exactly": exact,
            "skipped": [[s.where, s.reason, s.detail] for s in batch.skips]}


def _source_summary(label: str, chunks: list[dict], rows_file: str) -> dict:
    """Source totals from the chunk records (their rows already dropped: see :func:`_generate_source`)."""
    skipped = Counter(s[1] for c in chunks for s in c["skipped"])
    return {"name": label, "rows_file": rows_file, "prompts": sum(len(c["wheres"]) for c in chunks),
            "kept": sum(c["kept"] for c in chunks), "cut_by_max_new_tokens": sum(len(c["cut"]) for c in chunks),
            "cut_examples": [w for c in chunks for w in c["cut"]][:20],
            "generated_tokens": sum(c["generated_tokens"] for c in chunks),
            "retokenized_exactly": sum(c["retokenized_exactly"] for c in chunks),
            "skipped": dict(sorted(skipped.items())),
            "skipped_examples": [f"{w}: {r}" + (f" ({d})" if d else "") for c in chunks for w, r, d in c["skipped"]][:20],
            "seconds": round(sum(c.get("seconds", 0.0) for c in chunks), 3)}


def _generate_source(i: int, spec: SourceSpec, teacher: Callable[[], Any], tok, stop_ids, settings, out: Path,
                     controls: list[str], log) -> dict:
    """Commit every chunk of source ``i`` (resuming after the last committed one); write its rows file."""
    chunk_dir = out / "chunks" / f"src{i}"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    chunks = []
    for batch in _batches(spec, tok, settings, controls):
        path = chunk_dir / f"chunk_{batch.index:06d}.json"
        wheres = [p.where for p, _ in batch.prompts]
        if path.is_file():
            chunk = json.loads(path.read_text(encoding="utf-8"))
            if chunk["wheres"] != wheres:
                raise DistillError(f"{path}: committed for prompts {chunk['wheres'][:2]}..., but the source now gives "
                                   f"{wheres[:2]}...: the prompt files changed under a partly generated set; remove "
                                   f"{str(out)!r}")
        else:
            t0 = time.perf_counter()
            chunk = _answer(batch, teacher(), tok, stop_ids, settings, i)
            chunk["seconds"] = time.perf_counter() - t0
            _atomic_json(path, chunk)
            log(f"distill {spec.label}: chunk {batch.index} ({len(wheres)} prompts, {chunk['generated_tokens']} tokens, "
                f"{chunk['generated_tokens'] / max(chunk['seconds'], 1e-9):.0f} tokens/s, {len(chunk['cut'])} cut)")
        chunks.append({**chunk, "rows": None, "kept": len(chunk["rows"]), "path": path})  # rows stay on disk
    rows_path = out / "rows" / f"src{i}.jsonl"
    rows_path.parent.mkdir(exist_ok=True)
    rows = (row for c in chunks for row in json.loads(c["path"].read_text(encoding="utf-8"))["rows"])
    _atomic_json(rows_path, rows, lines=True)
    return _source_summary(spec.label, chunks, str(rows_path.relative_to(out)))


def generate_distill_set(prompts_spec, model, tokenizer, stop_ids, settings: DistillSettings, out_dir,
                         *, teacher_identity: dict | None = None, log: Callable[[str], None] | None = print) -> DistillSet:
    """Generate (or reuse, or resume) the distill set of ``prompts_spec`` into ``out_dir``.

    Args:
        prompts_spec: a :class:`SourceSpec` or a list of them (one rows file each, in order).
        model: the teacher: a DLM (its AR mode), a bare HF causal LM, a CachedLM, or a function of no
            argument returning one (called only if something is left to generate).
        tokenizer: a tokenizer directory or a loaded tokenizer (chat template needed).
        stop_ids: the stop set (:func:`nemodiff_train.models.stop_tokens.stop_token_ids`).
        settings: :class:`DistillSettings`.
        out_dir: the set's directory.
        teacher_identity: what names the teacher in the fingerprint (e.g. path + weights hash, or run,
            stage and step for ``current``); None hashes the model's parameters (loading it if a function).
    Returns:
        The complete :class:`DistillSet`.
    Raises:
        DistillError: ``out_dir`` holds another spec's set, a row lacks the prompt field, no stop id.
    """
    from .tokenizer import control_strings, load_tokenizer

    specs = [prompts_spec] if isinstance(prompts_spec, SourceSpec) else list(prompts_spec)
    if not specs:
        raise DistillError("no prompt source given")
    if not stop_ids:
        raise DistillError("no stop token ids: answers could only end at max_new_tokens and would all be cut")
    log = log or (lambda _msg: None)
    tok = load_tokenizer(str(tokenizer)) if isinstance(tokenizer, (str, Path)) else tokenizer
    if not getattr(tok, "chat_template", None):
        raise DistillError("the tokenizer has no chat_template; prompts are rendered with it")
    teacher = _Lazy(model)
    identity = teacher_identity if teacher_identity is not None else teacher.parameter_identity()
    fp, spec = distill_fingerprint(specs, identity, tokenizer_identity(tokenizer), tuple(stop_ids), settings)
    out = Path(out_dir)
    meta = _check_existing(out, fp)
    if meta is not None:
        log(f"{out}: distill set already generated with this spec (fingerprint {fp[:12]}), reusing it")
        return DistillSet(out, fp, [out / s["rows_file"] for s in meta["sources"]], meta)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / SPEC_FILE).is_file():
        _atomic_json(out / SPEC_FILE, {"fingerprint": fp, "spec": spec})
    controls = control_strings(tok)
    try:
        sources = [_generate_source(i, s, teacher.cached_lm, tok, tuple(stop_ids), settings, out, controls, log)
                   for i, s in enumerate(specs)]
    finally:
        teacher.restore()
    meta = {"distill_version": VERSION, "fingerprint": fp, "teacher": identity, "settings": asdict(settings),
            "stop_ids": [int(t) for t in stop_ids], "sources": sources}
    _atomic_json(out / META_FILE, meta)
    for s in sources:
        log(f"distill {s['name']}: {s['kept']} of {s['prompts']} answers kept, {s['cut_by_max_new_tokens']} cut by "
            f"max_new_tokens={settings.max_new_tokens}" + (f", skipped {s['skipped']}" if s["skipped"] else ""))
    return DistillSet(out, fp, [out / s["rows_file"] for s in sources], meta)


class _Lazy:
    """The teacher, built on first use, in eval mode while in use (its previous mode restored by :meth:`restore`)."""

    def __init__(self, model):
        self._model = None if callable(model) and not hasattr(model, "parameters") and not hasattr(model, "forward") \
            else model
        self._factory = model if self._model is None else None
        self._lm = None
        self._mode = None

    def model(self):
        if self._model is None:
            self._model = self._factory()
        return self._model

    def cached_lm(self):
        from .distill_teacher import cached_lm, inference_mode

        if self._lm is None:
            self._mode = inference_mode(self.model())
            self._mode.__enter__()
            self._lm = cached_lm(self.model())
        return self._lm

    def restore(self) -> None:
        """Back to the caller's mode; a teacher built here is dropped (and its GPU memory returned)."""
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        if self._factory is not None and self._model is not None:
            self._model = self._lm = None
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def parameter_identity(self) -> dict:
        """``{"kind": "parameters", "sha256"}`` over the teacher's parameter names, shapes and values."""
        model = self.model()
        module = getattr(getattr(model, "module", model), "hf", getattr(model, "module", model))
        h = hashlib.sha256()
        for name, p in module.state_dict().items():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}\0".encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        return {"kind": "parameters", "sha256": h.hexdigest()}
