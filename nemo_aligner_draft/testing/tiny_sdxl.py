"""A tiny random SDXL pipeline, saved as a real diffusers ``StableDiffusionXLPipeline`` directory.

The architecture is SDXL's, shrunk: a UNet with ``addition_embed_type="text_time"`` (pooled text
embedding + six size/crop time ids), two CLIP text encoders over the real CLIP vocabulary — a
``CLIPTextModel`` and a ``CLIPTextModelWithProjection`` — and an ``EulerDiscreteScheduler`` with
SDXL's configuration. The two encoders have different widths (32 and 48) so that a mix-up in their
order or in the concatenation of their hidden states changes shapes, not just numbers.
"""
from __future__ import annotations

import torch

from .tiny import TINY_TEXT, TINY_UNET, TINY_VAE, clip_tokenizer

TEXT_1 = dict(TINY_TEXT)  # CLIPTextModel: only its penultimate hidden states are used
TEXT_2 = dict(TINY_TEXT, hidden_size=48, intermediate_size=96, projection_dim=24)
TIME_EMBED_DIM = 8  # per time id; SDXL uses 256
NUM_TIME_IDS = 6  # (orig_h, orig_w, crop_top, crop_left, target_h, target_w)

TINY_SDXL_UNET = dict(
    TINY_UNET,
    cross_attention_dim=TEXT_1["hidden_size"] + TEXT_2["hidden_size"],
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=TEXT_2["projection_dim"] + NUM_TIME_IDS * TIME_EMBED_DIM,
    use_linear_projection=True,
)

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                      interpolation_type="linear", use_karras_sigmas=False)


def build_tiny_sdxl_pipeline(seed: int = 0, prediction_type: str = "epsilon",
                             force_zeros_for_empty_prompt: bool = True):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET)
    # SDXL's VAE config asks for fp32 decoding (its fp16 activations overflow)
    vae = AutoencoderKL(**TINY_VAE, force_upcast=True)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_1))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2))
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER, prediction_type=prediction_type)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False,
    )


def save_tiny_sdxl(path: str, seed: int = 0, prediction_type: str = "epsilon",
                   force_zeros_for_empty_prompt: bool = True) -> str:
    """Build and save a tiny SDXL pipeline directory at ``path``; returns ``path``."""
    pipe = build_tiny_sdxl_pipeline(seed, prediction_type, force_zeros_for_empty_prompt)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
