"""Evaluation tasks: where the samples come from, how a prompt becomes token ids, how output is scored.

Below ``eval/`` and ``bench/`` (``nemodiff-eval`` scores them, ``nemodiff-bench`` times its prompts), so
neither imports the other.

A task is small on purpose: ``samples()`` lists :class:`Sample` rows, ``render()`` turns one into
prompt ids for a given tokenizer, ``score()`` grades one output text. The evaluator does the rest.

Two kinds ship:

* ``code_completion`` (the default): the held-out rows built with the embedded model
  (``nemodiff_train/assets/data/code_completion_test.jsonl``): a Python signature + docstring as the
  prompt, the function body as the reference. Metrics: ``first_line_exact``, ``token_accuracy``,
  ``ast_valid``.
* ``arithmetic``: held-out grade-school word problems with worked solutions ending in
  ``#### <answer>`` (``nemodiff_train/assets/data/arithmetic_test.jsonl``, built by
  ``scripts/arithmetic_task.py``): templates, starting values, names and objects unseen in training.
  Metrics: ``exact_match`` (the ``#### <number>`` answer, lm-eval's GSM8K strict match; primary),
  ``flexible_match`` (the last number), ``token_accuracy`` of the worked solution.
* any ``*.jsonl`` file with ``prompt`` and ``reference`` fields: ``exact_match``, ``token_accuracy``.

Usage::

    task = get_task("code_completion", tokenizer=tok, limit=20)
    ids = task.render(tok, task.samples()[0])
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import scoring

__all__ = ["Sample", "Task", "CodeCompletionTask", "ArithmeticTask", "get_task", "BUILTIN_TASKS",
           "CODE_COMPLETION_FILE", "ARITHMETIC_FILE"]

_DATA = Path(__file__).resolve().parents[1] / "assets" / "data"
CODE_COMPLETION_FILE = _DATA / "code_completion_test.jsonl"
ARITHMETIC_FILE = _DATA / "arithmetic_test.jsonl"


@dataclass(frozen=True)
class Sample:
    """One evaluation row: the prompt text, the reference answer, and anything else the row had."""

    prompt_text: str
    reference: str
    meta: dict[str, Any] = field(default_factory=dict)


class Task:
    """A jsonl file of ``{"prompt", "reference", ...}`` rows scored by exact match and token accuracy.

    Args:
        path: the jsonl file.
        name: the task's name in reports (default: the file's stem).
        tokenizer: used by ``token_accuracy`` (whitespace words without one).
        limit: keep only the first ``limit`` rows (None: all).
        chat_template: wrap the prompt as a user turn with the tokenizer's chat template and
            ``add_generation_prompt``; ``None`` = when the tokenizer has a template.
        token_budget: compare at most this many reference tokens (see
            :func:`~nemodiff_train.tasks.scoring.token_accuracy`).
    """

    metric_names: tuple[str, ...] = ("exact_match", "token_accuracy")
    primary_metric: str = "token_accuracy"  # the one plotted against TPF
    # True when the primary metric reads the end of the output (a final answer): an output cut by
    # max_new_tokens before the reference's length then scores 0, and the evaluator warns.
    scores_the_end: bool = False

    def __init__(self, path: str | Path, *, name: str | None = None, tokenizer=None, limit: int | None = None,
                 chat_template: bool | None = None, token_budget: int | None = None):
        self.path = Path(path)
        self.name = name or self.path.stem
        self.tokenizer = tokenizer
        self.limit = limit
        self.chat_template = chat_template
        self.token_budget = token_budget
        self._samples: list[Sample] | None = None

    def samples(self) -> list[Sample]:
        """The task's rows (read once, cut to ``limit``)."""
        if self._samples is None:
            self._samples = _read_rows(self.path, self.limit)
        return self._samples

    def uses_chat_template(self, tokenizer) -> bool:
        if self.chat_template is not None:
            return self.chat_template
        return getattr(tokenizer, "chat_template", None) is not None

    def render(self, tokenizer, sample: Sample) -> list[int]:
        """Prompt token ids: the raw prompt, or a one-turn chat ending with the assistant header.

        The chat form is the default when the tokenizer has a template because the embedded model
        is SFT'd on chat rows whose user content is exactly the prompt text.
        """
        if self.uses_chat_template(tokenizer):
            messages = [{"role": "user", "content": sample.prompt_text}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            # The template already spells out every special token; adding BOS again would double it.
            return list(tokenizer.encode(text, add_special_tokens=False))
        return list(tokenizer.encode(sample.prompt_text))

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _token_accuracy(self, sample: Sample, output_text: str, strip: bool = True) -> float:
        """Token accuracy; ``strip`` drops surrounding whitespace first (as exact match does), so a
        leading space does not shift every position. Code keeps it: indentation is content there."""
        encode = self._encode if self.tokenizer is not None else None
        out, ref = (output_text.strip(), sample.reference.strip()) if strip else (output_text, sample.reference)
        return scoring.token_accuracy(out, ref, encode, self.token_budget)

    def score(self, sample: Sample, output_text: str) -> dict[str, float]:
        """Metrics of one output (generated text only, special tokens removed)."""
        return {"exact_match": scoring.exact_match(output_text, sample.reference),
                "token_accuracy": self._token_accuracy(sample, output_text)}


class CodeCompletionTask(Task):
    """Complete a Python function body from its signature and docstring.

    Metrics:
        first_line_exact: the first non-blank output line equals the reference's (stripped): the
            line a model most often gets right or wrong, and cheap to read in reports.
        token_accuracy: position-wise reference tokens reproduced.
        ast_valid: ``prompt + output`` parses, with the output cut where the function ends.
    """

    metric_names = ("first_line_exact", "token_accuracy", "ast_valid")
    primary_metric = "token_accuracy"

    def __init__(self, path: str | Path = CODE_COMPLETION_FILE, **kwargs):
        kwargs.setdefault("name", "code_completion")
        super().__init__(path, **kwargs)

    def score(self, sample: Sample, output_text: str) -> dict[str, float]:
        first = scoring.first_nonempty_line
        return {"first_line_exact": float(first(output_text) == first(sample.reference)),
                "token_accuracy": self._token_accuracy(sample, output_text, strip=False),
                "ast_valid": scoring.ast_valid(sample.prompt_text, output_text)}


class ArithmeticTask(Task):
    """Solve a word problem step by step and end with ``#### <answer>`` (GSM8K's format).

    Metrics:
        exact_match: the ``#### <number>`` answer equals the row's ``answer`` (lm-eval's GSM8K
            "strict-match"); the primary metric.
        flexible_match: the last number of the output equals it ("flexible-extract").
        token_accuracy: position-wise tokens of the reference worked solution reproduced.
    """

    metric_names = ("exact_match", "flexible_match", "token_accuracy")
    primary_metric = "exact_match"
    scores_the_end = True

    def __init__(self, path: str | Path = ARITHMETIC_FILE, **kwargs):
        kwargs.setdefault("name", "arithmetic")
        super().__init__(path, **kwargs)

    def score(self, sample: Sample, output_text: str) -> dict[str, float]:
        answer = scoring.normalise_number(str(sample.meta.get("answer") or scoring.strict_answer(sample.reference)))
        return {"exact_match": float(scoring.strict_answer(output_text) == answer),
                "flexible_match": float(scoring.flexible_answer(output_text) == answer),
                "token_accuracy": self._token_accuracy(sample, output_text)}


BUILTIN_TASKS: dict[str, type[Task]] = {"code_completion": CodeCompletionTask, "arithmetic": ArithmeticTask}


def get_task(name_or_path: str, **kwargs) -> Task:
    """A bundled task by name, or a :class:`Task` over a ``.jsonl`` file (keyword args: see Task)."""
    if name_or_path in BUILTIN_TASKS:
        return BUILTIN_TASKS[name_or_path](**kwargs)
    path = Path(name_or_path)
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise FileNotFoundError(f"task file {path} does not exist")
        return Task(path, **kwargs)
    raise ValueError(f"unknown task {name_or_path!r}: use one of {sorted(BUILTIN_TASKS)} or a path to a .jsonl file "
                     "with 'prompt' and 'reference' fields")


def _read_rows(path: Path, limit: int | None) -> list[Sample]:
    if not path.is_file():
        hint = " (built by scripts/build_embedded_model.py)" if path.parent == _DATA else ""
        raise FileNotFoundError(f"task data {path} does not exist{hint}")
    rows: list[Sample] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(rows) >= limit:
                break
            row = json.loads(line)
            missing = [k for k in ("prompt", "reference") if k not in row]
            if missing:
                raise ValueError(f"{path}:{lineno}: row lacks field(s) {missing}")
            meta = {k: v for k, v in row.items() if k not in ("prompt", "reference")}
            rows.append(Sample(row["prompt"], row["reference"], meta))
    return rows
