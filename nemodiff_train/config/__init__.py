"""Typed configuration (schema) and its Hydra loading/validation."""

from .errors import ConfigError
from .load import compose, to_config
from .schema import Config
from .validate import validate

__all__ = ["Config", "ConfigError", "compose", "to_config", "validate"]
