"""TPF during training: decode a few held-out prompts with the weights being trained.

At each validation the trainer calls a :class:`DecodeProbe` (built by ``nemodiff-train`` when
``eval.probe.samples > 0``). It decodes the first ``samples`` prompts of a task in the configured
modes with the current weights, on one rank, and returns flat metrics for ``metrics.jsonl`` and
W&B: ``probe_<mode>_tpf``, ``probe_<mode>_<task's primary metric>`` and, for the self-speculation
modes, ``probe_<mode>_lossless`` (AR is decoded as their reference). A run therefore shows TPF
rising while the conversion trains, beside the losses.

Cost: ``samples × modes`` decodes of up to ``max_new_tokens`` per validation; off (0) by default.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ..config.schema import EvalProbeConfig
from ..decoding import generate
from ..decoding.config import DecodeConfig
from ..decoding.modes import SPECULATIVE_MODES, with_reference
from ..models.stop_tokens import stop_token_ids
from ..tasks import get_task

log = logging.getLogger(__name__)

__all__ = ["DecodeProbe"]



class DecodeProbe:
    """``probe(dlm) -> {metric: value}``: decode the probe prompts with ``dlm``'s current weights.

    Args:
        cfg: ``eval.probe`` of the training config.
    """

    def __init__(self, cfg: EvalProbeConfig):
        from ..decoding import MODES

        unknown = [m for m in cfg.modes if m not in MODES]
        if unknown or not cfg.modes:
            raise ValueError(f"eval.probe.modes must be a non-empty subset of {sorted(MODES)}, got {cfg.modes}")
        self.cfg = cfg
        self.modes = with_reference(cfg.modes)[0]
        self._task = None
        self._prompts: list[list[int]] = []

    def _prepare(self, tokenizer) -> None:
        if self._task is None:
            self._task = get_task(self.cfg.task, tokenizer=tokenizer, limit=self.cfg.samples,
                                  token_budget=self.cfg.max_new_tokens)
            self._prompts = [self._task.render(tokenizer, s) for s in self._task.samples()]

    @torch.no_grad()
    def __call__(self, dlm) -> dict[str, Any]:
        """Metrics of one probe; ``dlm`` is the (unwrapped) :class:`~nemodiff_train.models.hf.DLMModel`."""
        from ..models.cached import HFCachedLM

        tokenizer = dlm.tokenizer
        if tokenizer is None:
            raise ValueError("eval.probe needs the model's tokenizer to render prompts")
        self._prepare(tokenizer)
        eos = stop_token_ids(tokenizer, getattr(dlm.hf, "generation_config", None))
        dcfg = DecodeConfig(max_new_tokens=self.cfg.max_new_tokens,
                            block_size=self.cfg.block_size or dlm.settings.inference_block_size,
                            threshold=self.cfg.threshold, commit_rule=self.cfg.commit_rule, temperature=0.0,
                            eos_token_ids=eos)
        was_training = dlm.training
        dlm.eval()
        try:
            lm = HFCachedLM(dlm)
            t0 = time.perf_counter()
            outputs = {m: [r for p in self._prompts for r in generate(lm, [p], m, dcfg)] for m in self.modes}
            seconds = time.perf_counter() - t0
        finally:
            dlm.train(was_training)
        return self._metrics(tokenizer, eos, outputs, seconds)

    def _metrics(self, tokenizer, eos, outputs: dict[str, list], seconds: float) -> dict[str, Any]:
        task = self._task
        metric = task.primary_metric
        out: dict[str, Any] = {"probe_seconds": seconds}
        for mode, results in outputs.items():
            tokens = sum(len(r.tokens) for r in results)
            forwards = sum(r.stats.forwards for r in results)
            texts = [tokenizer.decode([t for t in r.tokens if t not in eos], skip_special_tokens=True)
                     for r in results]
            scores = [task.score(s, t)[metric] for s, t in zip(task.samples(), texts)]
            out[f"probe_{mode}_tpf"] = tokens / forwards if forwards else 0.0
            out[f"probe_{mode}_{metric}"] = sum(scores) / len(scores)
            if mode in SPECULATIVE_MODES:
                same = [list(r.tokens) == list(a.tokens) for r, a in zip(results, outputs["ar"])]
                out[f"probe_{mode}_lossless"] = sum(same) / len(same)
        return out
