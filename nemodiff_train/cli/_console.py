"""Console hygiene shared by the entry points: library chatter that would read like our own output.

* transformers' and huggingface_hub's progress bars ("Loading weights", "Writing model shards"):
  seconds long for models this toolkit trains on a CPU, and in a log file they are carriage
  returns and cursor-up escape codes, so they are off unless asked for;
* matplotlib's INFO lines ("generated new fontManager") under a root logger at INFO.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["quiet_libraries", "interactive", "setup_console"]


def interactive() -> bool:
    """Both stdout and stderr are terminals (so a progress bar redraws in place instead of piling up)."""
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def quiet_libraries(progress_bars: bool = False) -> None:
    """Silence library INFO chatter; keep the libraries' progress bars only when ``progress_bars``."""
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    if progress_bars:
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass


def setup_console() -> None:
    """What every Hydra entry point does before its app: INFO logging with timestamps, library
    chatter off, and the libraries' progress bars only on a terminal."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libraries(progress_bars=interactive())
