"""JPEG (in)compressibility vs a direct PIL computation."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from nemo_aligner_draft.rewards import build_reward, require_differentiable
from reward_helpers import smooth_images


def _pil_kb(images):
    out = []
    for arr in (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr)).save(buf, "JPEG", quality=95)
        out.append(len(buf.getvalue()) / 1000)
    return torch.tensor(out)


def test_jpeg_rewards_equal_pil_sizes():
    smooth = smooth_images(1, 64, 64, seed=30)
    noisy = smooth_images(1, 64, 64, seed=30, noise=0.3)
    images = torch.cat([smooth, noisy])
    ref = _pil_kb(images)
    inc = build_reward("jpeg_incompressibility")(images, ["a", "b"])
    comp = build_reward("jpeg_compressibility")(images, ["a", "b"])
    torch.testing.assert_close(inc, ref)
    torch.testing.assert_close(comp, -ref)
    assert inc[1] > inc[0]  # noise is harder to compress


def test_jpeg_is_not_differentiable():
    reward = build_reward("jpeg_compressibility")
    assert reward.differentiable is False
    with pytest.raises(ValueError, match="jpeg_compressibility.*not differentiable.*DRaFT\\+"):
        require_differentiable(reward, "DRaFT+")
    clip_like = build_reward("colorfulness")
    assert require_differentiable(clip_like, "DRaFT+") is clip_like
