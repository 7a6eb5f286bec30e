"""Sampling and evaluation on the shapes domain: attribute accuracy (analytic checker),
``embedded_clip_score`` and TinyCLIP diversity of a pipeline's samples on a prompt list."""
from __future__ import annotations

from typing import Dict, Sequence

import torch

from ..core.sampler import StepPlan, sample
from . import checker


@torch.no_grad()
def sample_images(backend, prompts: Sequence[str], steps: int = 20, guidance_scale: float = 5.0,
                  seed: int = 0, size: int = 64) -> torch.Tensor:
    """DDIM (eta 0) with classifier-free guidance; returns images ``[B, 3, size, size]`` in [0, 1]."""
    rule = backend.step_rule(steps, "ddim")
    cond = backend.encode_prompts(list(prompts))
    latents = backend.initial_latents(len(prompts), size, size, rule, generator=torch.Generator().manual_seed(seed))
    out = sample(backend.denoiser(cond, guidance_scale), rule, latents, StepPlan.no_grad(steps))
    return backend.decode(out.latents)


def evaluate(images: torch.Tensor, prompts: Sequence[str], clip_reward=None, diversity=None) -> Dict[str, float]:
    """Checker accuracies (``color``, ``shape``, ``background``, ``count``, ``all``), plus the mean
    ``embedded_clip_score`` and the TinyCLIP diversity when those callables are given."""
    out = {f"acc_{k}": v for k, v in checker.accuracy(list(images), list(prompts)).items()}
    if clip_reward is not None:
        out["embedded_clip_score"] = float(clip_reward(images, list(prompts)).mean())
    if diversity is not None:
        out["diversity"] = float(diversity(images))
    return out
