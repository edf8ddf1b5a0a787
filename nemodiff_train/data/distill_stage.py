"""A ``distill`` stage's data: generate the teacher's answers, then prepare them as ``sft`` rows.

:func:`prepare_distill_stage` is what :func:`nemodiff_train.data.stage.prepare_stage` runs for a
stage of kind ``distill``:

1. the prompts of ``data.sources`` and ``data.val_sources`` are answered by the teacher into
   ``<prepared dir>.distill/`` (:func:`~nemodiff_train.data.distill.generate_distill_set`:
   fingerprinted, reused when unchanged, refused when changed, resumed after a kill);
2. each generated rows file becomes an ``sft`` source (same weight; its name carries the set's
   fingerprint, so regenerated answers can never be mistaken for the prepared ones) and the usual
   preparation writes the stage's prepared directory: loss masks cover the answers only.

The generated set sits beside the prepared directory, not in it, because the prepared directory
is moved into place whole and its readers (both engines) open it as it is.

Teachers: ``base`` loads ``model.path`` here (only if something is left to generate); ``current``
needs the model being trained, which only the trainer holds: it passes ``teacher_model``. The
``current`` teacher is named by the run's stage and the global step the stage starts at, so a run
resumed after the set was generated reuses it without looking at the (since trained) weights.
"""

from __future__ import annotations

from pathlib import Path

from .distill import DistillError, DistillSettings, generate_distill_set
from .prepare import DataPrepConfig, prepare
from .sources import SourceSpec
from ..models.stop_tokens import stop_token_ids

__all__ = ["distill_dir", "distill_settings", "prepare_distill_stage"]


def distill_dir(prepared: str | Path) -> Path:
    """Where the generated set of a stage whose prepared data is ``prepared`` lives."""
    prepared = Path(prepared)
    return prepared.parent / f"{prepared.name}.distill"


def distill_settings(d, seq_len: int) -> DistillSettings:
    """:class:`DistillSettings` from a stage's ``data.distill`` (prompts must leave room for an answer)."""
    return DistillSettings(teacher=d.teacher, prompt_field=d.prompt_field, max_new_tokens=d.max_new_tokens,
                           temperature=float(d.temperature), top_p=float(d.top_p), seed=d.seed,
                           batch_size=d.batch_size, max_prompts=d.max_prompts, max_prompt_tokens=seq_len - 1)


def _teacher(cfg, stage_index: int, tokenizer, teacher_model):
    """``(model or loader, identity, stop ids)`` of the stage's teacher."""
    from .tokenizer import load_tokenizer

    d = cfg.stages[stage_index].data.distill
    if d.teacher == "current" and teacher_model is None:
        raise DistillError(
            f"stages.{stage_index}.data.distill.teacher=current: the current model answers, and only the torch "
            "trainer holds it (it passes it at the stage's start); this caller has none. Use teacher=base, or the "
            "torch engine.")
    tok = load_tokenizer(str(tokenizer))
    if d.teacher == "base":
        from .distill_teacher import base_generation_config, base_teacher_identity, load_base_teacher

        path = cfg.model.path
        return (lambda: load_base_teacher(path, d.device)), base_teacher_identity(path), \
            stop_token_ids(tok, base_generation_config(path))
    hf = getattr(getattr(teacher_model, "module", teacher_model), "hf", teacher_model)
    start = sum(s.steps for s in cfg.stages[:stage_index])
    identity = {"kind": "current", "model_path": cfg.model.path, "adapter": cfg.adapter.name, "run_seed": cfg.run.seed,
                "stage_index": stage_index, "start_step": start}
    return teacher_model, identity, stop_token_ids(tok, getattr(hf, "generation_config", None))


def prepare_distill_stage(cfg, stage_index: int, out: Path, tokenizer, teacher_model=None) -> Path:
    """Generate (or reuse) the stage's distill set, then prepare it as ``sft`` data into ``out``."""
    stage = cfg.stages[stage_index]
    dc = stage.data
    from ..assets.resolve import resolve_data_source

    def specs(items):
        return [SourceSpec.parse(resolve_data_source(s), text_field=dc.text_field, messages_field=dc.messages_field)
                for s in items]

    train, val = specs(dc.sources), specs(dc.val_sources)
    model, identity, stops = _teacher(cfg, stage_index, tokenizer, teacher_model)
    generated = generate_distill_set(train + val, model, str(tokenizer), stops, distill_settings(dc.distill, dc.seq_len),
                                     distill_dir(out), teacher_identity=identity)
    as_sft = [SourceSpec(str(path), weight=spec.weight, name=f"distill:{spec.label}@{generated.fingerprint[:16]}")
              for spec, path in zip(train + val, generated.files)]
    prepare(DataPrepConfig(kind="sft", sources=as_sft[:len(train)], val_sources=as_sft[len(train):],
                           tokenizer=str(tokenizer), seq_len=dc.seq_len, out=str(out), val_fraction=dc.val_fraction,
                           num_proc=dc.num_proc, seed=cfg.run.seed, pack=dc.pack, max_documents=dc.max_documents,
                           max_bad_fraction=dc.max_bad_fraction))
    return out
