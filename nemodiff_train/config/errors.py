"""The one error type of the config package."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """An invalid configuration; the message names the offending key."""
