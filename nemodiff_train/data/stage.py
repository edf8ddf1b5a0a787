"""One training stage's data, prepared the same way for both engines.

:func:`prepare_stage` tokenizes and packs a stage's ``data.sources`` / ``data.val_sources`` with the
run's tokenizer into ``data.prepared_dir`` (default ``<run.dir>/data/<stage name>``). Preparation is
idempotent (a directory already prepared from the same inputs is kept), so a resumed or requeued
run reuses it. The caller decides which rank runs it; the torch engine then opens the memory maps,
the Megatron engine converts them to indexed datasets.

A ``distill`` stage first has its teacher answer the sources' prompts (:mod:`.distill_stage`), then
prepares those conversations exactly like an ``sft`` stage's.
"""

from __future__ import annotations

from pathlib import Path

from .. import runs
from ..assets.resolve import resolve_data_source
from .prepare import DataPrepConfig, prepare
from .sources import SourceSpec

__all__ = ["stage_dir", "prepare_stage"]


def stage_dir(cfg, stage_index: int, run_dir: str | Path) -> Path:
    """Where stage ``stage_index``'s prepared data lives."""
    stage = cfg.stages[stage_index]
    if stage.data.prepared_dir:
        return Path(stage.data.prepared_dir)
    return runs.stage_data_dir(run_dir, stage.name)


def prepare_stage(cfg, stage_index: int, run_dir: str | Path, tokenizer: str | Path, teacher_model=None) -> Path:
    """Prepare stage ``stage_index``'s data with ``tokenizer`` (an HF directory); returns its directory.

    ``teacher_model``: the model being trained, for a ``distill`` stage with ``teacher: current``
    (ignored otherwise, and not used when that stage's set is already generated).
    """
    dc = cfg.stages[stage_index].data
    out = stage_dir(cfg, stage_index, run_dir)
    if dc.kind == "distill":
        from .distill_stage import prepare_distill_stage

        return prepare_distill_stage(cfg, stage_index, out, tokenizer, teacher_model=teacher_model)

    def specs(items):
        return [SourceSpec.parse(resolve_data_source(s), text_field=dc.text_field, messages_field=dc.messages_field)
                for s in items]

    prepare(DataPrepConfig(kind=dc.kind, sources=specs(dc.sources), val_sources=specs(dc.val_sources),
                           tokenizer=str(tokenizer), seq_len=dc.seq_len, out=str(out),
                           val_fraction=dc.val_fraction, num_proc=dc.num_proc, seed=cfg.run.seed,
                           pack=dc.pack, max_documents=dc.max_documents, max_bad_fraction=dc.max_bad_fraction))
    return out
