"""Rewards on the shapes domain, registered in the project's reward registry.

* ``embedded_clip_score`` — the analogue of PickScore / HPSv2: TinyCLIP's image–text cosine
  similarity times ``scale`` (default 100, PickScore's convention, so settings tuned for PickScore
  carry over): ``r = scale · cos(f_img(x), f_txt(c))``, in [−scale, scale]. Differentiable in the
  image. Default weights: the shipped TinyCLIP (``rm.model.restore_from_path`` may point elsewhere).
* ``embedded_aesthetic`` — prompt-independent "palette fidelity": how cleanly the image is painted in
  the domain's flat palette colours. Per pixel, the soft minimum over the 9 palette colours of the
  squared RGB distance (``softmin_τ(d) = −τ·log Σ_k exp(−d_k/τ)``, τ = 0.01, RGB in [0, 1]);
  ``r = −100 · mean_pixels softmin``. Clean renders score ≈ 0 (slightly above: the soft minimum is
  below the hard one), muddy or blurred images score below (a uniform 50 % mix of two palette colours
  at the edges costs a few points). Analytic, no weights; a stand-in for a learned aesthetic head.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from ..rewards.base import Reward, register_reward
from . import data as shapes
from . import models


class EmbeddedClipScore(Reward):
    """``scale · cos`` between TinyCLIP image and text embeddings; images ``[B, 3, H, W]`` in [0, 1] → ``[B]``."""

    name = "embedded_clip_score"

    def __init__(self, path: Optional[str] = None, scale: float = 100.0):
        super().__init__()
        from transformers import CLIPTokenizer

        path = path or models.tinyclip_path()
        self.model = models.load_tinyclip(path)
        self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        self.scale = float(scale)
        self._text_cache: Dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings ``[B, P]``; cached per prompt (the text tower is frozen)."""
        device = self.model.logit_scale.device
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            enc = self.tokenizer(missing, padding="max_length", truncation=True,
                                 max_length=self.tokenizer.model_max_length, return_tensors="pt")
            feats = models.tinyclip_text_features(self.model, enc.input_ids.to(device), enc.attention_mask.to(device))
            for p, f in zip(missing, torch.nn.functional.normalize(feats, dim=-1)):
                self._text_cache[p] = f
        return torch.stack([self._text_cache[p].to(device) for p in prompts])

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings ``[B, P]``, differentiable."""
        return torch.nn.functional.normalize(models.tinyclip_image_features(self.model, images), dim=-1)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"embedded_clip_score: {images.shape[0]} images but {len(prompts)} prompts")
        return self.scale * (self.image_embeddings(images) * self.text_embeddings(list(prompts))).sum(-1)

    def _apply(self, fn, *args, **kwargs):  # cached text embeddings follow the module's device
        self._text_cache = {}
        return super()._apply(fn, *args, **kwargs)


class PaletteFidelity(Reward):
    """``−100 · mean_pixels softmin_τ_k ‖x − c_k‖²`` over the domain palette; images ``[B, 3, H, W]`` → ``[B]``."""

    name = "embedded_aesthetic"

    def __init__(self, temperature: float = 0.01):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"embedded_aesthetic: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        palette = torch.tensor([shapes.PALETTE[n] for n in shapes.PALETTE], dtype=torch.float32) / 255.0
        self.register_buffer("palette", palette, persistent=False)

    def forward(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        x = images.float().permute(0, 2, 3, 1)  # [B, H, W, 3]
        d = ((x[..., None, :] - self.palette.to(x.device)) ** 2).sum(-1)  # [B, H, W, 9]
        soft_min = -self.temperature * torch.logsumexp(-d / self.temperature, dim=-1)
        return -100.0 * soft_min.mean(dim=(1, 2))


@register_reward("embedded_clip_score")
def embedded_clip_score(path: Optional[str] = None, scale: float = 100.0, **kwargs) -> Reward:
    if kwargs:
        raise ValueError(f"reward 'embedded_clip_score' takes path and scale, got {sorted(kwargs)}")
    return EmbeddedClipScore(path=path, scale=scale)


@register_reward("embedded_aesthetic")
def embedded_aesthetic(temperature: float = 0.01, **kwargs) -> Reward:
    if kwargs:
        raise ValueError(f"reward 'embedded_aesthetic' takes temperature only, got {sorted(kwargs)}")
    return PaletteFidelity(temperature=temperature)
