"""Differentiable CLIP-style image preprocessing in torch.

Reward models were trained on images that went through PIL: resize (shortest edge, bicubic with
antialiasing when shrinking), centre crop, normalise. Here the same steps run on ``[B, 3, H, W]``
float tensors in [0, 1] so the reward's gradient reaches the generator's pixels.

``torch.nn.functional.interpolate(..., antialias=True)`` uses PIL's filter support and, for bicubic,
PIL's cubic coefficient a = −0.5, so it follows PIL closely. PIL also clips the resized image to [0, 255] (the
cubic kernel overshoots at edges), which is done here too; what remains is PIL rounding the resized
image to uint8 (≤ 0.5/255 per pixel before normalisation, amplified by 1/std ≈ 3.7) and its
fixed-point filter coefficients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL resample codes as stored in Hugging Face preprocessor_config.json ("resample").
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


@dataclass
class ClipPreprocessConfig:
    """What the reward model's own preprocessing does.

    resize_mode: "shortest" (shortest edge → ``size``, aspect kept) or "squash" (→ ``size × size``).
    crop_size: (height, width) of the centre crop, or None for no crop.
    crop_rounding: how an odd margin is split: "floor" (Hugging Face image processors) or "round"
        (torchvision ``CenterCrop``, used by open_clip).
    """

    size: int = 224
    resize_mode: str = "shortest"
    crop_size: Tuple[int, int] | None = (224, 224)
    crop_rounding: str = "floor"
    interpolation: str = "bicubic"
    mean: Sequence[float] = OPENAI_CLIP_MEAN
    std: Sequence[float] = OPENAI_CLIP_STD

    def __post_init__(self):
        if self.resize_mode not in ("shortest", "squash"):
            raise ValueError(f"resize_mode must be 'shortest' or 'squash', got {self.resize_mode!r}")
        if self.crop_rounding not in ("floor", "round"):
            raise ValueError(f"crop_rounding must be 'floor' or 'round', got {self.crop_rounding!r}")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {self.interpolation!r}")


def resized_shape(height: int, width: int, size: int, resize_mode: str) -> Tuple[int, int]:
    """Output (height, width): the short side becomes ``size``, the long side is truncated as both
    torchvision's ``Resize(int)`` and transformers' ``get_resize_output_image_size`` do."""
    if resize_mode == "squash":
        return size, size
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


class ClipPreprocess(torch.nn.Module):
    """``[B, 3, H, W]`` in [0, 1] → normalised ``[B, 3, h, w]`` model input, differentiable."""

    def __init__(self, cfg: ClipPreprocessConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
        cfg = self.cfg
        h, w = images.shape[-2:]
        new_h, new_w = resized_shape(h, w, cfg.size, cfg.resize_mode)
        x = images
        if (new_h, new_w) != (h, w):
            # antialias only acts when shrinking, exactly like PIL's filter support widening.
            x = F.interpolate(x, size=(new_h, new_w), mode=cfg.interpolation, align_corners=False, antialias=True)
            # PIL stores the resized image as uint8, clipping the cubic kernel's overshoot at edges.
            x = x.clamp(0.0, 1.0)
        if cfg.crop_size is not None:
            x = center_crop(x, cfg.crop_size, cfg.crop_rounding)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def center_crop(x: torch.Tensor, crop_size: Tuple[int, int], rounding: str) -> torch.Tensor:
    h, w = x.shape[-2:]
    ch, cw = crop_size
    if ch > h or cw > w:
        raise ValueError(f"centre crop {crop_size} is larger than the resized image {(h, w)}")
    if rounding == "floor":
        top, left = (h - ch) // 2, (w - cw) // 2
    else:
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return x[..., top:top + ch, left:left + cw]


def config_from_hf_image_processor(proc) -> ClipPreprocessConfig:
    """Read a transformers ``CLIPImageProcessor`` (its preprocessor_config.json) into our config."""
    # transformers 5 keeps sizes in a SizeDict (``get``/``[]`` like a dict); older ones in a dict or int.
    size = {"shortest_edge": proc.size} if isinstance(proc.size, int) else proc.size
    if size.get("shortest_edge"):
        edge, mode = int(size["shortest_edge"]), "shortest"
    elif size.get("height") and size.get("width") and size["height"] == size["width"]:
        edge, mode = int(size["height"]), "squash"
    else:
        raise ValueError(f"unsupported image processor size {proc.size!r}: expected shortest_edge or a square height/width")
    resample = int(proc.resample) if proc.resample is not None else 3
    if resample not in _PIL_RESAMPLE:
        raise ValueError(f"unsupported image processor resample {proc.resample!r}: expected 2 (bilinear) or 3 (bicubic)")
    crop = None
    if getattr(proc, "do_center_crop", False):
        cs = {"height": proc.crop_size, "width": proc.crop_size} if isinstance(proc.crop_size, int) else proc.crop_size
        crop = (int(cs["height"]), int(cs["width"]))
    if not getattr(proc, "do_normalize", True):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    return ClipPreprocessConfig(size=edge, resize_mode=mode, crop_size=crop, crop_rounding="floor",
                                interpolation=_PIL_RESAMPLE[resample], mean=mean, std=std)


def config_from_open_clip(model) -> ClipPreprocessConfig:
    """Read open_clip's ``model.visual.preprocess_cfg`` (what its ``preprocess`` transform does)."""
    pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = pp.get("size", model.visual.image_size)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ValueError(f"open_clip image size {size} is not square; unsupported")
        size = size[0]
    mode = pp.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise ValueError(f"open_clip resize_mode {mode!r} is unsupported (expected 'shortest' or 'squash')")
    interpolation = pp.get("interpolation", "bicubic")
    if interpolation == "random":  # open_clip's eval transform falls back to bicubic for 'random'
        interpolation = "bicubic"
    return ClipPreprocessConfig(size=int(size), resize_mode=mode,
                                crop_size=(int(size), int(size)) if mode == "shortest" else None,
                                crop_rounding="round", interpolation=interpolation,
                                mean=tuple(pp.get("mean", OPENAI_CLIP_MEAN)), std=tuple(pp.get("std", OPENAI_CLIP_STD)))
