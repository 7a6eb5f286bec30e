"""Typed configuration: schema, validation (every problem reported at once) and read tracking."""
from .schema import Config, ConfigError, load_config, validate  # noqa: F401
