"""Typed configuration (schema) and its Hydra loading/validation."""

from .load import ConfigError, compose, to_config, validate
from .schema import Config

__all__ = ["Config", "ConfigError", "compose", "to_config", "validate"]
