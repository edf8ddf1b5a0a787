"""The model card's machine-readable header: huggingface_hub's ``ModelCardData`` with a ``model-index``.

The Hub shows the ``model-index`` as an evaluation widget, and tools such as the Open LLM Leaderboard
read it. One ``model-index`` result per evaluated task × decoding mode: its metrics are the task's
accuracy metrics, TPF and tokens/s, plus *lossless* for the self-speculation modes. huggingface_hub
groups metrics into results by task type and data set (type, config, split, revision), so the mode is
the data set's ``config`` (and is named in the task name and each metric's ``config``, for readers).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

from ..decoding.modes import SPECULATIVE_MODES

__all__ = ["card_data", "eval_results", "is_hub_id", "MODE_METRICS", "TAGS"]

TAGS = ["diffusion", "dllm", "text-generation", "nemodiff"]
# eval.json key -> (metric type, human-readable name); accuracy metrics come from the rows themselves
MODE_METRICS = {"tpf": ("tpf", "tokens per forward (TPF)"), "tokens_per_s": ("tokens_per_s", "tokens/s"),
                "lossless": ("lossless", "lossless (share of outputs equal to AR greedy decoding)")}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# a relative data file or glob (``data/train.jsonl``) looks like ``owner/name`` when it is not on this machine
_DATA_FILE_SUFFIXES = {".json", ".jsonl", ".gz", ".parquet", ".arrow", ".txt", ".csv"}


def is_hub_id(name: Any) -> bool:
    """``owner/name`` that is not a local path (a local or embedded base has no Hub page to link)."""
    return isinstance(name, str) and bool(_HUB_ID.match(name)) and not os.path.exists(name)


def card_data(meta: dict[str, Any], rows: list[dict] | None, accuracy_metrics: list[str]) -> ModelCardData:
    """The YAML header for an export's ``nemodiff`` record ``meta`` and its evaluation ``rows``."""
    base = meta.get("base_model")
    results = eval_results(rows or [], accuracy_metrics)
    return ModelCardData(
        model_name=meta.get("recipe") or "nemodiff DLM",
        base_model=base if is_hub_id(base) else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=meta.get("license") or _base_license(base),
        datasets=_hub_datasets(meta) or None,
        tags=list(TAGS),
        eval_results=results or None,
    )


def eval_results(rows: list[dict], accuracy_metrics: list[str]) -> list[EvalResult]:
    """One ``EvalResult`` per (task, mode, metric) with a value; sweep points stay out (eval.json keeps them)."""
    results = []
    for row in rows:
        if row.get("sweep") or row.get("mode") == "base":  # the untouched base's row is not this model's result
            continue
        task, mode = str(row.get("task") or "evaluation"), str(row.get("mode"))
        metrics = [(m, m, m) for m in accuracy_metrics] + [(k, *v) for k, v in MODE_METRICS.items()
                                                          if k != "lossless" or mode in SPECULATIVE_MODES]
        for key, metric_type, metric_name in metrics:
            value = row.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            results.append(EvalResult(
                task_type="text-generation", task_name=f"{task} ({mode} decoding)",
                dataset_type=task, dataset_name=task, dataset_config=mode, metric_type=metric_type, metric_name=metric_name,
                metric_value=float(value), metric_config=mode))
    return results


def _hub_datasets(meta: dict) -> list[str]:
    """Hub data set ids among the stages' sources (local files and embedded data have no Hub page)."""
    from ..data.sources import SourceSpec

    sources = [s for stage in meta.get("stages") or [] for s in stage.get("sources") or []]
    sources += list(meta.get("data_sources") or [])
    found: list[str] = []
    for text in sources:
        try:
            name = SourceSpec.parse(str(text)).path_or_name
        except ValueError:
            continue
        local_looking = Path(name).suffix in _DATA_FILE_SUFFIXES or any(c in name for c in "*?[")
        if is_hub_id(name) and not local_looking and name not in found:
            found.append(name)
    return found


def _base_license(base: Any) -> str | None:
    """The base model's license from its own card, when one is on this machine (a local directory or the
    Hugging Face cache; never the network)."""
    if not isinstance(base, str) or not base:
        return None
    readme: Any = Path(base) / "README.md"
    if not readme.is_file():
        if not is_hub_id(base):
            return None
        from huggingface_hub import try_to_load_from_cache

        readme = try_to_load_from_cache(base, "README.md")
        if not isinstance(readme, str):
            return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.to_dict().get("license")
    except Exception:  # noqa: BLE001  (an unreadable base card only means: license unknown)
        return None
