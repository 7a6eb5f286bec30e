"""Analytic rewards that need no weights."""
from __future__ import annotations


from .base import Reward, register_reward


class Colorfulness(Reward):
    """Hasler & Süsstrunk (2003) colourfulness M = σ_rgyb + 0.3·μ_rgyb on [0, 1] RGB, differentiable.

    rg = R − G, yb = (R + G)/2 − B; σ_rgyb = sqrt(σ_rg² + σ_yb²), μ_rgyb = sqrt(μ_rg² + μ_yb²).
    Prompt-independent: the project's stand-in for an aesthetic score on synthetic images.
    """

    name = "colorfulness"

    def forward(self, images, prompts=None):
        r, g, b = images.float().unbind(dim=1)
        rg, yb = r - g, 0.5 * (r + g) - b
        std = (rg.var(dim=(1, 2), unbiased=False) + yb.var(dim=(1, 2), unbiased=False) + 1e-8).sqrt()
        mean = (rg.mean(dim=(1, 2)) ** 2 + yb.mean(dim=(1, 2)) ** 2 + 1e-8).sqrt()
        return std + 0.3 * mean


@register_reward("colorfulness")
def colorfulness(**kwargs) -> Reward:
    if kwargs:
        raise ValueError(f"reward 'colorfulness' takes no arguments, got {sorted(kwargs)}")
    return Colorfulness()


class Brightness(Reward):
    """Mean Rec. 601 luma of [0, 1] RGB, differentiable. A smoke-test reward: any model can raise it."""

    name = "brightness"

    def forward(self, images, prompts=None):
        r, g, b = images.float().unbind(dim=1)
        return (0.299 * r + 0.587 * g + 0.114 * b).mean(dim=(1, 2))


@register_reward("brightness")
def brightness(**kwargs) -> Reward:
    if kwargs:
        raise ValueError(f"reward 'brightness' takes no arguments, got {sorted(kwargs)}")
    return Brightness()
