"""Published architectures at full size with random weights, built from config dicts (nothing is
downloaded): SD1.5 and SDXL-base pipelines and the CLIP towers of the reward models.

Sources of the numbers: the ``config.json`` files of the diffusers repositories
``stable-diffusion-v1-5/stable-diffusion-v1-5`` (unet/, vae/, text_encoder/) and
``stabilityai/stable-diffusion-xl-base-1.0`` (unet/, vae/, text_encoder/, text_encoder_2/); the HF
``CLIPModel`` configs of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (PickScore's and HPSv2's backbone)
and ``openai/clip-vit-large-patch14`` (the LAION aesthetic predictor's embedding, 768-d).
"""
from __future__ import annotations

from typing import Dict

import torch

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.18215,
)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 vocab_size=49408, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_TEXT = dict(SD15_TEXT, hidden_act="quick_gelu")  # CLIP ViT-L/14's text tower
SDXL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                   vocab_size=49408, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")

# HF CLIPModel configs: text_config / vision_config / projection_dim
CLIP_VIT_H_14 = dict(
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                     vocab_size=49408, max_position_embeddings=77, hidden_act="gelu"),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                       image_size=224, patch_size=14, hidden_act="gelu"),
    projection_dim=1024,
)
CLIP_VIT_L_14 = dict(
    text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                     vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu"),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                       image_size=224, patch_size=14, hidden_act="quick_gelu"),
    projection_dim=768,
)
REWARD_CLIPS: Dict[str, dict] = {"pickscore": CLIP_VIT_H_14, "hpsv2": CLIP_VIT_H_14, "aesthetic": CLIP_VIT_L_14}


def build_pipeline(family: str, seed: int = 0):
    """A diffusers ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` of the published shapes,
    random weights, float32."""
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .tiny import clip_tokenizer

    torch.manual_seed(seed)
    if family == "sd":
        return StableDiffusionPipeline(
            unet=UNet2DConditionModel(**SD15_UNET), vae=AutoencoderKL(**SD15_VAE),
            text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)), tokenizer=clip_tokenizer(),
            scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if family == "sdxl":
        return StableDiffusionXLPipeline(
            unet=UNet2DConditionModel(**SDXL_UNET), vae=AutoencoderKL(**SDXL_VAE),
            text_encoder=CLIPTextModel(CLIPTextConfig(**SDXL_TEXT)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2)),
            tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(),
            scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             steps_offset=1, timestep_spacing="leading"))
    raise ValueError(f"family must be 'sd' or 'sdxl', got {family!r}")


def save_pipeline(family: str, path: str, dtype: torch.dtype = torch.float16) -> str:
    """Save :func:`build_pipeline` as a diffusers directory (``dtype`` on disk; fp16 as the hub ships)."""
    pipe = build_pipeline(family)
    pipe.to(dtype=dtype)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def save_reward_clip(name: str, path: str, dtype: torch.dtype = torch.float16) -> str:
    """A HF ``CLIPModel`` directory of the reward's backbone with its processor files (tokenizer and
    preprocessor_config.json, as ``CLIPProcessor.save_pretrained`` writes them)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from .tiny import clip_tokenizer

    spec = REWARD_CLIPS[name]
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=spec["text_config"], vision_config=spec["vision_config"],
                                 projection_dim=spec["projection_dim"]))
    model.to(dtype=dtype).save_pretrained(path, safe_serialization=True)
    clip_tokenizer().save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(path)
    return path
