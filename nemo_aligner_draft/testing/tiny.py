"""Tiny random Stable Diffusion pipelines, saved as real diffusers pipeline directories.

Shapes follow DESIGN §5: UNet (32, 64) channels, 1 layer per block, cross-attention dim 32;
a ×8 VAE with 4 latent channels; a 2-layer CLIP text encoder of width 32 over the real CLIP vocab.
"""
from __future__ import annotations


import torch

from ..embedded.tokenizer import cached_clip_tokenizer_dir

TINY_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
    in_channels=4,
    out_channels=4,
    sample_size=8,
)
TINY_VAE = dict(
    block_out_channels=(16, 16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    norm_num_groups=8,
    layers_per_block=1,
    sample_size=64,
)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                 vocab_size=49408, max_position_embeddings=77, projection_dim=32)


def clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(cached_clip_tokenizer_dir(), local_files_only=True)


def build_tiny_sd_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_tiny_sd(path: str, seed: int = 0, prediction_type: str = "epsilon") -> str:
    """Build and save a tiny SD pipeline directory at ``path``; returns ``path``."""
    build_tiny_sd_pipeline(seed, prediction_type).save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_aesthetic(path: str, seed: int = 0):
    """The files the ``aesthetic`` reward loads, tiny and random: a CLIPModel directory with projection 768
    (as CLIP ViT-L/14; vision 224 px, patch 32, width 32) and an MLP head in LAION's
    ``sac+logos+ava1-l14-linearMSE.pth`` layout. Returns (clip directory, head file) under ``path``."""
    import os

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    small = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1)
    cfg = CLIPConfig(text_config=dict(small, vocab_size=49408, max_position_embeddings=77),
                     vision_config=dict(small, image_size=224, patch_size=32), projection_dim=768)
    clip_dir = os.path.join(path, "clip")
    CLIPModel(cfg).save_pretrained(clip_dir)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=clip_tokenizer()).save_pretrained(clip_dir)
    dims = [768, 1024, 128, 64, 16, 1]
    head = {}
    for i, (n_in, n_out) in zip([0, 2, 4, 6, 7], zip(dims, dims[1:])):  # Linear positions (Dropouts between)
        head[f"layers.{i}.weight"] = torch.randn(n_out, n_in) * n_in ** -0.5
        head[f"layers.{i}.bias"] = torch.zeros(n_out)
    head_path = os.path.join(path, "sac+logos+ava1-l14-linearMSE.pth")
    torch.save(head, head_path)
    return clip_dir, head_path
