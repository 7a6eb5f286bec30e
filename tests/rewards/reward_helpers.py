"""Helpers for the reward tests: tiny models in real on-disk formats, test images."""
import json

import numpy as np
import torch
import torch.nn.functional as F

TINY_OPEN_CLIP = "tiny-test-ViT-32"
TINY_OPEN_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def save_tiny_hf_clip(path: str, projection_dim: int = 32, seed: int = 0, logit_scale: float = 2.3) -> str:
    """A random CLIPModel (vision 224 px, patch 32, width 32) + CLIPProcessor with the real CLIP
    tokenizer and default CLIPImageProcessor, saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from nemo_aligner_draft.testing.tiny import clip_tokenizer

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                           image_size=224, patch_size=32),
        projection_dim=projection_dim, logit_scale_init_value=logit_scale)
    CLIPModel(cfg).save_pretrained(path)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=clip_tokenizer()).save_pretrained(path)
    return path


def save_tiny_open_clip(d) -> tuple:
    """(arch name, checkpoint path): the tiny config is registered with open_clip under
    TINY_OPEN_CLIP, and its random weights saved HPS-style as {"state_dict": ...}."""
    import open_clip

    with open(d / f"{TINY_OPEN_CLIP}.json", "w") as f:
        json.dump(TINY_OPEN_CLIP_CFG, f)
    open_clip.add_model_config(str(d / f"{TINY_OPEN_CLIP}.json"))
    torch.manual_seed(1)
    model = open_clip.create_model(TINY_OPEN_CLIP, pretrained=None)
    ckpt = str(d / "hps_tiny.pt")
    torch.save({"state_dict": model.state_dict()}, ckpt)
    return TINY_OPEN_CLIP, ckpt


def smooth_images(batch: int, height: int, width: int, seed: int = 0, noise: float = 0.0) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` quantised to multiples of 1/255 (so PIL sees exactly the same pixels):
    bilinear upsampling of coarse noise, optionally with per-pixel noise of std ``noise``."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, height // 8 + 1, width // 8 + 1, generator=g)
    x = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    x = x + noise * torch.randn(x.shape, generator=g)
    return (x.clamp(0, 1) * 255).round() / 255


def to_pil(images: torch.Tensor):
    from PIL import Image

    arr = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


PROMPTS = ["a photo of a red fox in the snow", "an oil painting of a lighthouse at dusk"]
