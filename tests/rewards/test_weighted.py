"""weighted_sum: total equals Σ w_i r_i of independently built components; each part logged."""
import pytest
import torch

from nemo_aligner_draft.rewards import build_reward, require_differentiable
from reward_helpers import PROMPTS, smooth_images


def test_weighted_sum_equals_components(tiny_hf_clip_dir):
    comps = [
        {"name": "pickscore", "weight": 0.5, "path": tiny_hf_clip_dir},
        {"name": "colorfulness", "weight": -2.0},
        {"name": "clip_score", "weight": 3.0, "path": tiny_hf_clip_dir, "kwargs": {"scale": 2.5}, "label": "clip"},
    ]
    reward = build_reward("weighted_sum", components=comps)
    images = smooth_images(2, 64, 64, seed=40)
    with torch.no_grad():
        total, parts = reward.score_with_parts(images, PROMPTS)
        pick = build_reward("pickscore", path=tiny_hf_clip_dir)(images, PROMPTS)
        col = build_reward("colorfulness")(images, PROMPTS)
        clip = build_reward("clip_score", path=tiny_hf_clip_dir, scale=2.5)(images, PROMPTS)
    assert set(parts) == {"pickscore", "colorfulness", "clip"}
    torch.testing.assert_close(parts["pickscore"], pick)
    torch.testing.assert_close(parts["colorfulness"], col)
    torch.testing.assert_close(parts["clip"], clip)
    torch.testing.assert_close(total, 0.5 * pick - 2.0 * col + 3.0 * clip)
    torch.testing.assert_close(reward(images, PROMPTS), total)
    assert reward.differentiable
    images.requires_grad_(True)
    reward(images, PROMPTS).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_weighted_sum_with_jpeg_is_not_differentiable_and_labels_unique():
    reward = build_reward("weighted_sum", components=[
        {"name": "jpeg_compressibility", "weight": 1.0}, {"name": "jpeg_compressibility", "weight": 0.5}])
    assert reward.differentiable is False
    with pytest.raises(ValueError, match="not differentiable"):
        require_differentiable(reward, "AlignProp")
    images = smooth_images(2, 32, 32, seed=41)
    total, parts = reward.score_with_parts(images, ["a", "b"])
    assert set(parts) == {"jpeg_compressibility", "jpeg_compressibility#1"}
    torch.testing.assert_close(total, 1.5 * parts["jpeg_compressibility"])


def test_weighted_sum_bad_config():
    with pytest.raises(ValueError, match="needs components"):
        build_reward("weighted_sum")
    with pytest.raises(ValueError, match=r"components\[0\] needs 'name' and 'weight'"):
        build_reward("weighted_sum", components=[{"name": "colorfulness"}])
    with pytest.raises(ValueError, match=r"components\[0\]: unknown keys \['wieght'\]"):
        build_reward("weighted_sum", components=[{"name": "colorfulness", "wieght": 1}])
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        build_reward("weighted_sum", components=[{"name": "nope", "weight": 1}])
