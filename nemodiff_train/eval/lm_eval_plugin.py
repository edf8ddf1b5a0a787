"""An lm-evaluation-harness model, ``nemodiff``: any lm-eval task in any decoding mode, with TPF.

* ``generate_until`` decodes with the chosen mode (``ar``, ``diffusion``, ``linear_spec``,
  ``quadratic_spec``), stops at EOS, and cuts the text at the first ``until`` string.
* ``loglikelihood`` / ``loglikelihood_rolling`` are computed exactly with the causal (AR) view
  of the same weights: the sum of log-probabilities of the continuation tokens given the context.
  (A diffusion model only gives an ELBO; the AR view is the exact likelihood NLD models provide.)
* Decoding counts are accumulated over the run: they are logged after each ``generate_until``
  call, written to ``stats_out`` when given, and returned by :meth:`get_model_info`, which lm-eval
  copies into ``results["config"]`` of its output file.

lm-eval 0.4.x registers models only when their module is imported and does not read the
``lm_eval`` entry-point group, so run it through the wrapper that imports this module first::

    python -m nemodiff_train.cli.lm_eval --model nemodiff \\
        --model_args pretrained=<hf dir or run dir>,mode=linear_spec,max_gen_toks=256 --tasks gsm8k

Model args: ``pretrained`` (required), ``mode`` (linear_spec), ``block_size`` (the model's inference
block), ``threshold`` (0.9), ``commit_rule`` (confident; prefix or prefix_ar, diffusion only),
``max_gen_toks`` (256), ``temperature`` (0), ``dtype`` (float32),
``device`` (auto), ``batch_size`` (1; ar/diffusion only), ``max_length`` (the model's context),
``add_bos_token`` (false), ``stats_out`` (a JSON path), ``seed`` (0).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  - fills the registry first: get_model() imports built-ins only while it is empty
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..decoding import MODES, generate
from ..decoding.config import DecodeConfig
from ..models.loading import load_for_decoding

# A child of lm-eval's logger, so the summary lines use lm-eval's handler and verbosity.
log = logging.getLogger("lm_eval.models.nemodiff")

__all__ = ["NemoDiffLM", "DecodeTotals"]


@dataclass
class DecodeTotals:
    """Counts accumulated over every ``generate_until`` request of a run."""

    requests: int = 0
    generated_tokens: int = 0
    forwards: int = 0
    prefill_forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    seconds: float = 0.0
    loglikelihood_requests: int = 0
    loglikelihood_seconds: float = 0.0

    def add(self, results, seconds: float) -> None:
        self.requests += len(results)
        self.seconds += seconds
        for r in results:
            self.generated_tokens += len(r.tokens)
            self.forwards += r.stats.forwards
            self.prefill_forwards += r.stats.prefill_forwards
            self.drafted += r.stats.drafted
            self.accepted += r.stats.accepted

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["tpf"] = self.generated_tokens / self.forwards if self.forwards else 0.0
        d["tpf_note"] = "prefill forwards excluded"
        d["tokens_per_s"] = self.generated_tokens / self.seconds if self.seconds > 0 else 0.0
        return d


@register_model("nemodiff")
class NemoDiffLM(TemplateLM):
    """lm-eval model over a nemodiff DLM (see the module docstring for the arguments)."""

    def __init__(self, pretrained: str, mode: str = "linear_spec", block_size: int | None = None,
                 threshold: float = 0.9, commit_rule: str = "confident", max_gen_toks: int = 256,
                 temperature: float = 0.0,
                 dtype: str = "float32", device: str = "auto", batch_size: int | str = 1,
                 max_batch_size: int | None = None, max_length: int | None = None, add_bos_token: bool = False,
                 stats_out: str | None = None, seed: int = 0, **unused):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        if unused:
            log.warning("nemodiff ignores model args %s", sorted(unused))
        self.dlm, self.lm, self.eos_ids, self.hf_dir = load_for_decoding(pretrained, dtype, _device(device))
        self.tokenizer = self.dlm.tokenizer
        self.mode = mode
        self.block_size = int(block_size or self.dlm.settings.inference_block_size)
        self.threshold = float(threshold)
        self.commit_rule = str(commit_rule)
        DecodeConfig(commit_rule=self.commit_rule)  # refused here, before any task runs
        self.max_gen_toks = int(max_gen_toks)
        self.temperature = float(temperature)
        self.dtype = dtype
        self.seed = int(seed)
        self.batch_size = _batch_size(batch_size)
        self.add_bos_token = bool(add_bos_token)
        self._max_length = int(max_length or getattr(self.dlm.config, "max_position_embeddings", 2048))
        self.stats_out = Path(stats_out) if stats_out else None
        self.totals = DecodeTotals()
        self._device = self.lm.device

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """As lm-eval's, except that ``--model_args`` win over the CLI-wide settings instead of clashing.

        lm-eval passes ``device`` (default ``cuda:0``), ``batch_size`` and ``max_batch_size`` next to
        the model args; the base class would fail with "multiple values for keyword argument".
        """
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    # -- tokenisation ----------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.eos_ids[0]

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else int(bos)

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return list(self.tokenizer.encode(string, add_special_tokens=special))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t not in self.eos_ids], skip_special_tokens=True)

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # -- likelihoods (causal view) ---------------------------------------------------------------

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Sum of continuation log-probs and whether greedy decoding reproduces it, per request."""
        t0 = time.perf_counter()
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        # Longest first: a batch is right-padded to its first row, and causal attention keeps padding
        # on the right invisible to every real position.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            for i, res in zip(idx, self._score_batch([requests[i] for i in idx])):
                out[i] = res
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], res)
        self.totals.loglikelihood_requests += len(requests)
        self.totals.loglikelihood_seconds += time.perf_counter() - t0
        self._write_stats()
        return out  # type: ignore[return-value]

    def _score_batch(self, batch) -> list[tuple[float, bool]]:
        seqs, conts = [], []
        for _, ctx, cont in batch:
            if not cont:
                raise ValueError("empty continuation in a loglikelihood request")
            # Inputs are (context + continuation) minus the last token, cut on the left to the window.
            seqs.append((ctx + cont)[-(self.max_length + 1):][:-1])
            conts.append(cont)
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.eot_token_id, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s)
        logits = self.dlm.causal_logits(ids.to(self.lm.device)).float()  # [b, width, V]; logit i predicts token i+1
        results = []
        for r, (s, cont) in enumerate(zip(seqs, conts)):
            n = len(cont)
            logp = F.log_softmax(logits[r, len(s) - n:len(s)], dim=-1)  # [n, V]
            target = torch.tensor(cont, device=logp.device)
            total = float(logp.gather(-1, target[:, None]).sum())
            greedy = bool((logp.argmax(-1) == target).all())
            results.append((total, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, in disjoint windows of at most ``max_length`` tokens."""
        out = []
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text, add_special_tokens=False), self.prefix_token_id, self.max_length, 1)]
            scored = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            total = sum(s for s, _ in scored)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # -- generation --------------------------------------------------------------------------------

    def _decode_config(self, gen_kwargs: dict[str, Any]) -> tuple[DecodeConfig, list[str]]:
        """Our decode settings and the stop strings for one request's ``gen_kwargs``."""
        gen_kwargs = dict(gen_kwargs)
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
        temperature = float(gen_kwargs.pop("temperature", self.temperature))
        if gen_kwargs.pop("do_sample", None) is False:
            temperature = 0.0
        top_p = float(gen_kwargs.pop("top_p", 1.0) or 1.0)
        cfg = DecodeConfig(max_new_tokens=max_new, block_size=self.block_size, threshold=self.threshold,
                           commit_rule=self.commit_rule, temperature=temperature,
                           top_p=top_p if temperature > 0 else 1.0,
                           eos_token_ids=self.eos_ids, seed=self.seed)
        return cfg, until

    def _prompt_ids(self, context: str, max_new: int) -> list[int]:
        ids = self.tok_encode(context) if context else [self.prefix_token_id]
        keep = max(1, self.max_length - max_new)
        return ids[-keep:]  # left-truncate so prompt + generation fit the model's context

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Decode each request with ``self.mode``; consecutive requests with equal settings share a batch."""
        outputs: list[str] = []
        calls = self.totals.requests
        i = 0
        while i < len(requests):
            context, gen_kwargs = requests[i].args
            cfg, until = self._decode_config(gen_kwargs)
            group = [requests[i]]
            while len(group) < self.batch_size and i + len(group) < len(requests) \
                    and requests[i + len(group)].args[1] == gen_kwargs:
                group.append(requests[i + len(group)])
            prompts = [self._prompt_ids(r.args[0], cfg.max_new_tokens) for r in group]
            t0 = time.perf_counter()
            results = generate(self.lm, prompts, self.mode, cfg)
            if self.lm.device.type == "cuda":
                torch.cuda.synchronize(self.lm.device)
            self.totals.add(results, time.perf_counter() - t0)
            for req, res in zip(group, results):
                text = _cut_at_stops(self.tok_decode(res.tokens), until)
                self.cache_hook.add_partial("generate_until", req.args, text)
                outputs.append(text)
            i += len(group)
        self._report(self.totals.requests - calls)
        return outputs

    def _report(self, new_requests: int) -> None:
        d = self.totals.as_dict()
        log.info("nemodiff %s: %d generate requests (%d in this call), %d tokens, %d forwards (prefill excluded), "
                 "TPF %.2f, %.1f tok/s", self.mode, d["requests"], new_requests, d["generated_tokens"],
                 d["forwards"], d["tpf"], d["tokens_per_s"])
        self._write_stats()

    def _write_stats(self) -> None:
        if self.stats_out is not None:
            self.stats_out.parent.mkdir(parents=True, exist_ok=True)
            self.stats_out.write_text(json.dumps(self.get_model_info()["nemodiff"], indent=2) + "\n")

    def get_model_info(self) -> dict[str, Any]:
        """Settings and decode counts; lm-eval adds this to ``results["config"]``."""
        return {"nemodiff": {"model": str(self.hf_dir), "mode": self.mode, "block_size": self.block_size,
                             "threshold": self.threshold, "commit_rule": self.commit_rule,
                             "temperature": self.temperature, "dtype": self.dtype,
                             "device": str(self.lm.device), "batch_size": self.batch_size,
                             "decode_stats": self.totals.as_dict()}}


def _cut_at_stops(text: str, until: list[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            pos = text.find(stop)
            if pos != -1:
                cut = min(cut, pos)
    return text[:cut]


def _device(device: str | None) -> str:
    """lm-eval's CLI defaults ``--device`` to ``cuda:0`` even on machines without CUDA: fall back to the CPU."""
    if not device:
        return "auto"
    if device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available; using the CPU", device)
        return "cpu"
    return device


def _batch_size(value: int | str) -> int:
    if isinstance(value, str):
        if value.startswith("auto"):
            log.warning("nemodiff does not search batch sizes; batch_size=%s runs with 1", value)
            return 1
        value = int(value)
    if value < 1:
        raise ValueError(f"batch_size must be >= 1, got {value}")
    return int(value)
