"""Torch preprocessing vs the libraries' own PIL-based preprocessing on the same uint8 images.

Tolerances, in normalised units (pixel / std; one uint8 level is 1/255/0.2613 ≈ 0.0150 there):
PIL resizes uint8 → uint8, so its output is rounded to whole levels (≤ 0.5 level) and its
fixed-point filter adds a little more; torch's antialiased bicubic (PIL's a = −0.5 kernel and
support) does not round. On smooth images the measured worst case is 1.07 levels (0.0160): we allow
1.5 levels (0.0226) per pixel and 0.4 level (0.006) mean. On images with per-pixel noise PIL also clips
between its horizontal and vertical passes (the cubic kernel overshoots); measured worst case 0.0554:
we allow 0.07 per pixel, same mean bound.
"""
import pytest
import torch

from nemo_aligner_draft.rewards.preprocess import (ClipPreprocess, ClipPreprocessConfig, config_from_hf_image_processor,
                                                   config_from_open_clip, resized_shape)
from reward_helpers import smooth_images, to_pil

LEVEL = 1 / 255 / 0.26130258
SMOOTH_MAX, NOISY_MAX, MEAN_MAX = 1.5 * LEVEL, 0.07, 0.4 * LEVEL
# (256, 301): shortest edge → 224 × 263, odd margin 39 (floor vs round crops differ by one pixel);
# (64, 64) upsamples (tiny SD output); (512, 512) and (1024, 1024) downsample with antialiasing.
SHAPES = [(256, 301), (301, 256), (64, 64), (512, 512), (1024, 1024)]


def _hf_processors():
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return [CLIPImageProcessorPil(), CLIPImageProcessor()]


def _diff(ours, ref):
    d = (ours - ref).abs()
    return d.max().item(), d.mean().item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("noise,max_tol", [(0.0, SMOOTH_MAX), (0.05, NOISY_MAX)])
def test_hf_preprocess_matches_clip_image_processor(shape, noise, max_tol):
    images = smooth_images(2, *shape, seed=sum(shape), noise=noise)
    for proc in _hf_processors():  # the PIL backend and transformers' own torchvision-on-uint8 backend
        ref = proc(images=to_pil(images), return_tensors="pt")["pixel_values"]
        ours = ClipPreprocess(config_from_hf_image_processor(proc))(images)
        assert ours.shape == ref.shape == (2, 3, 224, 224)
        mx, mean = _diff(ours, ref)
        assert mx <= max_tol and mean <= MEAN_MAX, (type(proc).__name__, shape, mx, mean)


def test_wrong_crop_rounding_is_detected():
    """The odd margin of (256, 301) is split differently by floor and round: a one-pixel shift must
    fail the tolerance above, so the comparison can tell the two conventions apart."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil()
    images = smooth_images(1, 256, 301, seed=3, noise=0.05)
    ref = proc(images=to_pil(images), return_tensors="pt")["pixel_values"]
    cfg = config_from_hf_image_processor(proc)
    cfg.crop_rounding = "round"
    mx, mean = _diff(ClipPreprocess(cfg)(images), ref)
    assert mx > NOISY_MAX or mean > MEAN_MAX


@pytest.mark.parametrize("shape", SHAPES)
def test_open_clip_preprocess_matches_its_transform(tiny_open_clip, shape):
    import open_clip

    arch, ckpt = tiny_open_clip
    model, _, preprocess_val = open_clip.create_model_and_transforms(arch, pretrained=None)
    images = smooth_images(2, *shape, seed=sum(shape) + 1, noise=0.05)
    ref = torch.stack([preprocess_val(im) for im in to_pil(images)])
    ours = ClipPreprocess(config_from_open_clip(model))(images)
    assert ours.shape == ref.shape == (2, 3, 224, 224)
    mx, mean = _diff(ours, ref)
    assert mx <= NOISY_MAX and mean <= MEAN_MAX, (shape, mx, mean)


def test_resized_shape_truncates_long_side_like_torchvision():
    # 224 · 301 / 256 = 263.375 → 263 (truncated, not rounded)
    assert resized_shape(256, 301, 224, "shortest") == (224, 263)
    assert resized_shape(301, 256, 224, "shortest") == (263, 224)
    assert resized_shape(300, 100, 224, "squash") == (224, 224)


def test_bad_config_and_shape():
    with pytest.raises(ValueError, match="resize_mode"):
        ClipPreprocessConfig(resize_mode="longest")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        ClipPreprocess(ClipPreprocessConfig())(torch.rand(1, 4, 32, 32))
