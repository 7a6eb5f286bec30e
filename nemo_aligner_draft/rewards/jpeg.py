"""JPEG (in)compressibility (Black et al. 2023, DDPO): the size of the image saved as JPEG.

``jpeg_incompressibility`` = +size in kB (1 kB = 1000 bytes) at quality 95,
``jpeg_compressibility`` = −size. Images are quantised as ``round(255·x)`` clamped to [0, 255], then
encoded by PIL, like ddpo-pytorch. Not differentiable: only policy-gradient methods (DDPO) use them.
"""
from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .base import Reward, register_reward


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] → JPEG byte size / 1000 ``[B]`` (float32, on ``images.device``)."""
    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for arr in arrays:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegSize(Reward):
    differentiable = False

    def __init__(self, sign: float, name: str, quality: int = 95):
        super().__init__()
        self.sign = sign
        self.name = name
        self.quality = quality

    def forward(self, images: torch.Tensor, prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
        return self.sign * jpeg_size_kb(images, self.quality)


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = 95) -> Reward:
    return JpegSize(+1.0, "jpeg_incompressibility", quality)


@register_reward("jpeg_compressibility")
def jpeg_compressibility(quality: int = 95) -> Reward:
    return JpegSize(-1.0, "jpeg_compressibility", quality)
