"""Reward registry.

A reward maps images ``[B, 3, H, W]`` in [0, 1] (float) and their prompts to scores ``[B]``.
Rewards are frozen: their parameters never require grad and never enter an optimizer. A reward that
is not differentiable (JPEG size) says so with ``differentiable = False``; gradient methods refuse it.

Names resolve in this order: a registered name (``clip_score``), or ``package.module:callable`` for
a user's own factory (the callable receives the same keyword arguments and returns a ``Reward`` or a
plain callable ``(images, prompts) -> [B]``).
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

REWARDS: Dict[str, Callable[..., "Reward"]] = {}


class Reward(torch.nn.Module):
    """Base class. Subclasses implement ``forward(images, prompts) -> [B]``."""

    differentiable: bool = True
    name: str = "reward"

    def freeze(self) -> "Reward":
        self.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode: bool = True):  # rewards stay in eval mode whatever the trainer does
        return super().train(False)

    def score_with_parts(self, images: torch.Tensor, prompts: Sequence[str]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        r = self(images, prompts)
        return r, {self.name: r}


class CallableReward(Reward):
    """Wraps a plain ``(images, prompts) -> [B]`` callable from ``module:callable``."""

    def __init__(self, fn: Callable, name: str, differentiable: bool = True):
        super().__init__()
        self.fn = fn
        self.name = name
        self.differentiable = differentiable

    def forward(self, images, prompts):
        return self.fn(images, prompts)


def register_reward(name: str):
    """Decorator: ``@register_reward("my_reward")`` on a factory ``(**kwargs) -> Reward``."""

    def deco(factory):
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = factory
        return factory

    return deco


def resolve_factory(name: str) -> Callable[..., Reward]:
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"rm.name: cannot import module {module_name!r} for reward {name!r}: {e}") from e
        if not hasattr(module, attr):
            raise ValueError(f"rm.name: module {module_name!r} has no attribute {attr!r}")
        return getattr(module, attr)
    raise ValueError(f"rm.name: unknown reward {name!r}; registered: {sorted(REWARDS)}, "
                     f"or give 'package.module:callable'")


def build_reward(name: str, path: Optional[str] = None, **kwargs) -> Reward:
    """Build a frozen reward. ``path`` is the local weights path (``rm.model.restore_from_path``)."""
    factory = resolve_factory(name)
    if path is not None:
        kwargs["path"] = path
    reward = factory(**kwargs)
    if not isinstance(reward, Reward):
        if not callable(reward):
            raise TypeError(f"reward factory {name!r} returned {type(reward).__name__}, not a callable")
        reward = CallableReward(reward, name=name)
    if reward.name == "reward":
        reward.name = name
    return reward.freeze()


def check_reward_output(r: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Validate a reward's output: a float tensor of shape [B]."""
    if not torch.is_tensor(r):
        raise TypeError(f"reward {name!r} returned {type(r).__name__}, expected a tensor of shape [{batch}]")
    if r.shape != (batch,):
        raise ValueError(f"reward {name!r} returned shape {tuple(r.shape)}, expected [{batch}]")
    if not r.is_floating_point():
        raise TypeError(f"reward {name!r} returned dtype {r.dtype}, expected a floating dtype")
    return r
