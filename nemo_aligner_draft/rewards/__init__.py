"""Reward models: a registry of factories, each returning a :class:`~.base.Reward`."""
from .base import REWARDS, Reward, build_reward, register_reward  # noqa: F401
from . import builtin  # noqa: F401  (registers the built-in rewards)
