"""Where training numbers go: ``metrics.jsonl``, the console (a progress bar per stage, or plain lines
when the output is not a terminal), and W&B when configured.

Only rank 0 writes. Secrets never reach any sink: the config holds none (W&B reads its API key
from the environment itself) and :func:`redact` scrubs token-like keys from anything logged.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...runs import METRICS_FILE

__all__ = ["MetricsSink", "WandbRun", "LossEMA", "redact"]

_SECRET_KEY = re.compile(r"(token|api[_-]?key|secret|password)", re.IGNORECASE)


def redact(obj: Any) -> Any:
    """Replace the values of secret-looking keys (``*token*``, ``*api_key*``...) by ``"***"``."""
    if isinstance(obj, dict):
        return {k: ("***" if _SECRET_KEY.search(str(k)) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


SMOOTHING = 0.8
"""Weight of the previous value in the loss EMA shown on the console, per logged step (about the last
five logged steps count). One step's loss jumps with its noise draw (t ~ U(0,1) per row), so the raw
value says little about the trend; ``metrics.jsonl`` keeps every raw value."""


class LossEMA:
    """Bias-corrected exponential moving average: ``value`` is the plain mean while few points are in."""

    def __init__(self, beta: float = SMOOTHING):
        self.beta, self._sum, self._weight = beta, 0.0, 0.0

    def update(self, x: float) -> float:
        if math.isfinite(x):
            self._sum = self.beta * self._sum + (1 - self.beta) * x
            self._weight = self.beta * self._weight + (1 - self.beta)
        return self.value

    @property
    def value(self) -> float:
        return self._sum / self._weight if self._weight else float("nan")


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


@dataclass
class WandbRun:
    """A W&B run to open: ``logging.wandb`` (project, mode...), the config to record (redacted), its name."""

    cfg: Any
    config_dict: dict
    name: str = "run"


class MetricsSink:
    """Append-only metrics of one run (rank 0 only; other ranks get a silent sink).

    Console output, in order: a header line per stage (:meth:`start_stage`), the stage's progress,
    each validation result as it is computed, and :meth:`message` lines. Progress is a tqdm bar per
    stage when both stdout and stderr are terminals, and otherwise one plain line per logged step
    (no carriage returns or escape codes in log files). The bar and the lines show the smoothed
    loss (:class:`LossEMA`) beside the last raw value.

    Args:
        wandb: the W&B run to mirror the records to (``logging.wandb``), if any.
        stream: where progress goes (default ``sys.stderr``); messages go to stdout.
    """

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int,
                 progress_bar: bool, wandb: "WandbRun | None" = None, stream=None):
        self.enabled = enabled
        self._file = open(Path(run_dir) / METRICS_FILE, "a") if enabled else None
        self._stream = stream if stream is not None else sys.stderr
        self._show_progress = progress_bar
        self._use_bar = progress_bar and _isatty(self._stream) and _isatty(sys.stdout)
        self._total_steps = total_steps
        self._bar = None
        self._stage: tuple[str, int, int] | None = None  # (name, first, last) of the current stage
        self._ema = LossEMA()
        self._last: dict = {}
        self._wandb = None
        if not enabled:
            return
        if wandb is not None and wandb.cfg.project and wandb.cfg.mode != "disabled":
            self._wandb = _start_wandb(Path(run_dir), wandb.cfg, redact(wandb.config_dict), wandb.name)

    def start_stage(self, name: str, index: int, count: int, first: int, last: int, step: int,
                    detail: str = "") -> None:
        """Print the stage's header line; its bar opens with the first :meth:`progress` (after data preparation).

        Args:
            index, count: the stage's 0-based index and the number of stages.
            first, last: global steps before the stage's first step and at its end.
            step: the global step training continues from (``> first`` when resuming).
            detail: shown in the header (e.g. what one step consumes).
        """
        self.end_stage()
        self._stage = (name, first, last)
        self._ema = LossEMA()
        if not self.enabled:
            return
        text = f"stage {index + 1}/{count} {name}: steps {first + 1}-{last}"
        text += f" ({detail})" if detail else ""
        text += f", resuming after step {step}" if step > first else ""
        self.message(text)

    def end_stage(self) -> None:
        """Close the current stage's bar (its final state stays on screen)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def log(self, record: dict) -> None:
        """Write one record (must hold ``step``); validation records are also printed."""
        if not self.enabled:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        record.setdefault("time", time.time())
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"},
                            step=int(record["step"]))
        if isinstance(record.get("loss"), (int, float)):
            self._ema.update(float(record["loss"]))
            self._last = record
        if "val_ar_loss" in record:
            self.message(_validation_line(record, self._stage))

    def progress(self, step: int, postfix: dict) -> None:
        """Show training progress at global ``step`` (``postfix``: extra values for the bar)."""
        if not self.enabled or not self._show_progress:
            return
        name, first, last = self._stage or ("train", 0, self._total_steps)
        if self._use_bar and self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=last - first, initial=step - first, desc=name, unit="step", leave=True,
                             dynamic_ncols=True, file=self._stream, mininterval=1.0)
        shown = {"loss(ema)": f"{self._ema.value:.3f}"}
        shown.update({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()
                      if k != "loss"})
        if self._bar is not None:
            self._bar.n = step - first
            self._bar.set_postfix(shown, refresh=True)
            return
        r = self._last if self._last.get("step") == step else {}
        parts = [f"{name} step {step - first}/{last - first}", f"loss {self._ema.value:.3f} (ema)"]
        if isinstance(r.get("loss"), float):
            parts[-1] += f", last {r['loss']:.3f}"
        if isinstance(r.get("ar_loss"), float) and isinstance(r.get("diffusion_loss"), float):
            parts.append(f"ar {r['ar_loss']:.3f}, diffusion {r['diffusion_loss']:.3f}")
        if isinstance(r.get("lr"), float):
            parts.append(f"lr {r['lr']:.2e}")
        tps = postfix.get("tok/s", r.get("tokens_per_s"))
        if isinstance(tps, (int, float)):
            parts.append(f"{tps:,.0f} tok/s")
        self.message("  " + " | ".join(parts))

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self) -> None:
        self.end_stage()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _validation_line(record: dict, stage: tuple[str, int, int] | None) -> str:
    """``  step 150 validation (pretrain): AR loss 4.412, diffusion loss 10.310[, masked-token accuracy 0.123]``
    and, when the decode probe ran, a second line with its TPF per mode."""
    step = record["step"]
    where = record.get("stage") or (stage[0] if stage else "")
    if step == 0:
        where += ", the base model before training"
    elif stage is not None and step == stage[1]:
        where += ", before this stage"
    ar, diff = record.get("val_ar_loss"), record.get("val_diffusion_loss")
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    text = f"  step {step} validation ({where}): AR loss {fmt(ar)}, diffusion loss {fmt(diff)}"
    if isinstance(record.get("val_masked_token_accuracy"), float):
        text += f", masked-token accuracy {record['val_masked_token_accuracy']:.3f}"
    tpf = {k[len("probe_"):-len("_tpf")]: v for k, v in record.items()
           if k.startswith("probe_") and k.endswith("_tpf") and isinstance(v, (int, float))}
    if tpf:  # the decode probe (eval.probe): tokens per forward with the current weights
        # Beside its task score: TPF alone flatters a model that commits many wrong tokens at once.
        metric = next((k[len(f"probe_{m}_"):] for m in tpf for k in record
                       if k.startswith(f"probe_{m}_") and not k.endswith(("_tpf", "_lossless"))), None)
        score = lambda m: record.get(f"probe_{m}_{metric}")  # noqa: E731
        text += f"\n    decode probe (TPF, {metric}): " if metric else "\n    decode probe TPF: "
        text += ", ".join(f"{m} {v:.2f}" + (f" / {score(m):.2f}" if isinstance(score(m), (int, float)) else "")
                          for m, v in tpf.items())
    return text


def _start_wandb(run_dir: Path, cfg, config_dict: dict, run_name: str):
    try:
        import wandb
    except ImportError:
        raise RuntimeError("logging.wandb.project is set but wandb is not installed: pip install 'nemodiff-train[wandb]'") from None
    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or run_name, mode=cfg.mode,
                      tags=list(cfg.tags), dir=str(run_dir), id=run_id, resume="allow", config=config_dict)
