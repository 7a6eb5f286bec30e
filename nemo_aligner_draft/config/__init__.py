"""Typed configuration: the section classes (:mod:`.schema`) and their validation."""
from ..errors import ConfigError  # noqa: F401
from .schema import Config, ModelConfig, load_config, validate, validate_model, world_size  # noqa: F401
