"""Where training numbers go: ``metrics.jsonl``, a console progress bar, and W&B when configured.

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
from pathlib import Path
from typing import Any

__all__ = ["MetricsSink", "redact"]

_SECRET_KEY = re.compile(r"(token|api[_-]?key|secret|password)", re.IGNORECASE)


def redact(obj: Any) -> Any:
    """Replace the values of secret-looking keys (``*token*``, ``*api_key*``...) by ``"***"``."""
    if isinstance(obj, dict):
        return {k: ("***" if _SECRET_KEY.search(str(k)) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


class MetricsSink:
    """Append-only metrics of one run (rank 0 only; other ranks get a silent sink)."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int,
                 progress_bar: bool, wandb_cfg=None, config_dict: dict | None = None, run_name: str = "run"):
        self.enabled = enabled
        self._file = open(Path(run_dir) / "metrics.jsonl", "a") if enabled else None
        self._bar = None
        self._wandb = None
        if not enabled:
            return
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=run_name, unit="step",
                             dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
        if wandb_cfg is not None and wandb_cfg.project and wandb_cfg.mode != "disabled":
            self._wandb = _start_wandb(Path(run_dir), wandb_cfg, redact(config_dict or {}), run_name)

    def log(self, record: dict) -> None:
        """Write one record (must hold ``step``)."""
        if not self.enabled:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        record.setdefault("time", time.time())
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"},
                            step=int(record["step"]))

    def progress(self, step: int, postfix: dict) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                  refresh=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


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
