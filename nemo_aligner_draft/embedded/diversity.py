"""Sample diversity on the shapes domain: mean pairwise cosine distance of TinyCLIP image embeddings.

    D = 1 − (1 / (B(B−1))) · Σ_{i≠j} cos(e_i, e_j)

over a batch of B ≥ 2 images (0 when all images embed identically; larger when they differ in what
TinyCLIP sees: colour, shape, background, count, position). Used in place of LPIPS, whose backbones
need a download. Compare values only at the same batch composition (e.g. the same prompts, seeds
varying): a DRaFT run that collapses diversity lowers D for a fixed prompt set.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import models


def mean_pairwise_cosine_distance(embeddings: torch.Tensor) -> torch.Tensor:
    """``[B, P]`` → scalar ``1 − mean_{i≠j} cos(e_i, e_j)``; needs B ≥ 2."""
    b = embeddings.shape[0]
    if b < 2:
        raise ValueError(f"diversity needs at least 2 images, got {b}")
    e = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    sim = e @ e.t()
    off_diagonal = sim.sum() - sim.diagonal().sum()
    return 1.0 - off_diagonal / (b * (b - 1))


class TinyClipDiversity:
    """Callable ``images [B, 3, H, W] in [0, 1] → scalar D`` (no grad), TinyCLIP loaded once."""

    def __init__(self, path: Optional[str] = None, model=None):
        self.model = model if model is not None else models.load_tinyclip(path)
        self.model.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        device = self.model.logit_scale.device
        return mean_pairwise_cosine_distance(models.tinyclip_image_features(self.model, images.to(device)))
