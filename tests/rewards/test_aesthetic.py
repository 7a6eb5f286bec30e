"""LAION aesthetic predictor: tiny CLIP (projection 768, as ViT-L/14) + a random head saved in LAION's
state-dict layout, vs a direct transformers + plain-MLP computation."""
import pytest
import torch

from nemo_aligner_draft.rewards import build_reward
from reward_helpers import PROMPTS, save_tiny_hf_clip, smooth_images, to_pil


class LaionMLP(torch.nn.Module):
    """Written out independently of the package: the layout of sac+logos+ava1-l14-linearMSE.pth."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="module")
def aesthetic_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("aesthetic")
    clip_dir = save_tiny_hf_clip(str(d / "clip_l14"), projection_dim=768, seed=3)
    torch.manual_seed(4)
    mlp = LaionMLP().eval()
    with torch.no_grad():  # variance-preserving init, so scores differ visibly between images
        for m in mlp.layers:
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=m.in_features ** -0.5)
    head = str(d / "sac+logos+ava1-l14-linearMSE.pth")
    torch.save(mlp.state_dict(), head)
    return clip_dir, head, mlp


def _reference(clip_dir, mlp, images):
    from transformers import CLIPModel, CLIPProcessor

    proc = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)
    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    pixels = proc(images=to_pil(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        emb = model.get_image_features(pixel_values=pixels).pooler_output
        return mlp(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1), pixels


def test_aesthetic_equals_direct_computation(aesthetic_files):
    clip_dir, head, mlp = aesthetic_files
    images = smooth_images(2, 256, 256, seed=20)
    ref, pixels = _reference(clip_dir, mlp, images)
    reward = build_reward("aesthetic", path=head, clip_path=clip_dir)
    exact = build_reward("aesthetic", path=head, clip_path=clip_dir)
    exact.encoder.preprocess = torch.nn.Identity()
    with torch.no_grad():
        r = reward(images, PROMPTS)
        r_exact = exact(pixels, PROMPTS)
    torch.testing.assert_close(r_exact, ref, atol=1e-5, rtol=0)
    # torch vs PIL preprocessing: measured ≤ 4.7e-5 over 64², 256², 512², 256×301 inputs, while
    # scores of different images differ by ≈ 3e-3 on this random tiny model: we allow 2e-4.
    assert (ref[0] - ref[1]).abs() > 1e-3
    torch.testing.assert_close(r, ref, atol=2e-4, rtol=0)


def test_aesthetic_gradients_reach_images(aesthetic_files):
    clip_dir, head, _ = aesthetic_files
    reward = build_reward("aesthetic", path=head, clip_path=clip_dir)
    reward.train()  # the trainer may call train(): dropout must stay off
    assert not reward.training and not reward.head.training
    images = smooth_images(2, 64, 64, seed=21).requires_grad_(True)
    r1 = reward(images, PROMPTS)
    r1.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    torch.testing.assert_close(reward(images, PROMPTS), r1)  # deterministic: no dropout


def test_aesthetic_bad_inputs(aesthetic_files, tmp_path):
    clip_dir, head, _ = aesthetic_files
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_reward("aesthetic", path=str(tmp_path / "missing.pth"), clip_path=clip_dir)
    with pytest.raises(FileNotFoundError, match="clip_path"):
        build_reward("aesthetic", path=head)
    torch.save({"fc.weight": torch.zeros(1, 768)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="layers.0.weight"):
        build_reward("aesthetic", path=str(tmp_path / "wrong.pth"), clip_path=clip_dir)
    small = save_tiny_hf_clip(str(tmp_path / "clip32"), projection_dim=32)
    with pytest.raises(ValueError, match="projection_dim 32"):
        build_reward("aesthetic", path=head, clip_path=small)
