"""Reward registry.

A reward maps images ``[B, 3, H, W]`` in [0, 1] (float) and their prompts to scores ``[B]``.
Rewards are frozen: their parameters never require grad and never enter an optimizer. A reward that
is not differentiable (JPEG size) says so with ``differentiable = False``; gradient methods refuse it.

Names resolve in this order: a registered name (``clip_score``), or ``package.module:callable`` for
a user's own factory (the callable receives the same keyword arguments and returns a ``Reward`` or a
plain callable ``(images, prompts) -> [B]``).
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ..core.precision import autocast_off
from ..errors import InputError

REWARDS: Dict[str, Callable[..., "Reward"]] = {}


class Reward(torch.nn.Module):
    """Base class. Subclasses implement ``forward(images, prompts) -> [B]``.

    ``fp32 = True`` runs the reward in float32 even under a bf16/fp16 autocast region: autocast is
    switched off inside and the images are cast to float32 (NeMo-Aligner scores its reward model in
    fp32 the same way). Its parameters are pinned to float32 too: a dtype cast applied from outside
    (``module.to(torch.bfloat16)`` by a ``bf16-true`` trainer) is ignored, device moves still apply.
    A tensor output comes back in at least float32 either way.
    """

    differentiable: bool = True
    name: str = "reward"
    fp32: bool = False
    # the prompt the start-up probe scores two grey images with; a reward that parses its prompts
    # (the shapes benchmark) names one it accepts
    probe_prompt: str = "a photo"

    def __call__(self, images: torch.Tensor, prompts: Optional[Sequence[str]] = None, *args, **kwargs) -> torch.Tensor:
        with self.precision_scope():
            r = super().__call__(self.cast_input(images), prompts, *args, **kwargs)
        return _at_least_fp32(r) if torch.is_tensor(r) else r  # non-tensors are left for check_reward_output

    def _apply(self, fn, recurse=True):
        if not self.fp32:
            return super()._apply(fn, recurse)

        def keep_dtype(t):
            # fn is opaque (.to/.cuda/.bfloat16 closures): probe it on a scalar to see if it casts.
            if not t.is_floating_point():
                return fn(t)
            probe = fn(torch.zeros((), dtype=t.dtype, device=t.device))
            return fn(t) if probe.dtype == t.dtype else t.to(device=probe.device)

        return super()._apply(keep_dtype, recurse)

    def cast_input(self, images: torch.Tensor) -> torch.Tensor:
        return _at_least_fp32(images) if self.fp32 else images

    def precision_scope(self):
        """Context for running the reward: autocast off and fp32 parameters when ``self.fp32``."""
        if not self.fp32:
            return contextlib.nullcontext()
        if any(p.dtype != torch.float32 for p in self.parameters() if p.is_floating_point()):
            self.float()  # fp32 was switched on after a cast: best effort
        return autocast_off()

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


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Half precisions → float32; float64 (gradient checks) stays float64."""
    return x.float() if x.is_floating_point() and x.element_size() < 4 else x


def require_differentiable(reward: Reward, method_name: str) -> Reward:
    """Raise if ``reward`` cannot be back-propagated through (e.g. JPEG size) for a gradient method."""
    if not getattr(reward, "differentiable", True):
        raise ValueError(
            f"reward {getattr(reward, 'name', type(reward).__name__)!r} is not differentiable, but "
            f"{method_name} back-propagates the reward into the sampler; use it with a policy-gradient "
            f"method (DDPO) or pick a differentiable reward")
    return reward


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
            raise ValueError(f"cannot import module {module_name!r} for reward {name!r}: {e}") from e
        if not hasattr(module, attr):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
        return getattr(module, attr)
    raise ValueError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}, "
                     f"or give 'package.module:callable'")


def build_reward(name: str, path: Optional[str] = None, fp32: bool = False, **kwargs) -> Reward:
    """Build a frozen reward. ``path`` is the local weights path (``rm.model.restore_from_path``);
    ``fp32`` forces float32 scoring under autocast (see :class:`Reward`); other keyword arguments go
    to the factory."""
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
    if fp32:
        reward.fp32 = True
    return reward.freeze()


def check_reward_output(r: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Validate a reward's output: a floating tensor of shape ``[B]``. A wrong output is the fault of the
    reward ``rm.name`` chose, so it is an :class:`InputError` of that key, not a crash.
    Finiteness is not checked here: a NaN reward is the NaN guard's job (skip the step, count it)."""
    if not torch.is_tensor(r):
        raise InputError("rm.name", f"reward {name!r} returned {type(r).__name__}, expected a float tensor of "
                                    f"shape [{batch}] (one score per image)")
    if tuple(r.shape) != (batch,):
        raise InputError("rm.name", f"reward {name!r} returned shape {tuple(r.shape)}, expected [{batch}] "
                                    f"(one score per image)")
    if not r.is_floating_point():
        raise InputError("rm.name", f"reward {name!r} returned dtype {r.dtype}, expected a floating dtype "
                                    f"(float32, bfloat16, ...)")
    return r
