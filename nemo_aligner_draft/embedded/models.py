"""Architectures of the embedded models and where their shipped weights live.

* SD pipeline (diffusers ``StableDiffusionPipeline`` directory): a ×8 ``AutoencoderTiny`` with 4 latent
  channels (64 px → 8×8×4 latents), a ``UNet2DConditionModel`` with cross-attention at both levels,
  a 2-layer ``CLIPTextModel`` of width 64 over the real 49,408-token CLIP vocabulary, and SD's DDIM
  schedule (scaled-linear betas 0.00085–0.012, ε-prediction).
* TinyCLIP (transformers ``CLIPModel`` directory + ``CLIPProcessor``): ViT over 8×8 patches of the
  64 px image, a 2-layer text tower of width 32, 32-d joint embedding.

Prompts are at most 32 tokens (``model_max_length``): every caption of the domain fits in 16.
Weights are stored in float16 to keep the shipped set small; loaders here return float32 modules.
"""
from __future__ import annotations

import os

import torch

MAX_TOKENS = 32
BOS_ID, EOS_ID = 49406, 49407

# diffusers ``AutoencoderTiny`` (the TAESD architecture: plain conv + ReLU blocks, no normalisation), ×8,
# 4 latent channels. Measured (embedded/README.md): SD's ``AutoencoderKL`` normalises every block with
# GroupNorm, which on these flat-colour images removes the absolute colour of the shapes; this one keeps it.
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    encoder_block_out_channels=(32, 32, 32, 32), decoder_block_out_channels=(32, 32, 32, 32),
    num_encoder_blocks=(1, 2, 2, 2), num_decoder_blocks=(2, 2, 2, 1), act_fn="relu",
)
UNET_CONFIG = dict(
    in_channels=4, out_channels=4, sample_size=8,
    block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
)
TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
    max_position_embeddings=MAX_TOKENS, projection_dim=64,
    bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)
TINYCLIP_TEXT = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
    max_position_embeddings=MAX_TOKENS, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
)
TINYCLIP_VISION = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3,
                       image_size=64, patch_size=8, num_channels=3)
TINYCLIP_PROJECTION = 32
# CLIP's image normalisation (OpenAI); TinyCLIP is trained with it so the stock processor applies.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


def pipeline_path() -> str:
    """The shipped diffusers pipeline directory (pass it to ``load_backend``)."""
    return _existing(os.path.join(ASSETS, "sd"))


def tinyclip_path() -> str:
    """The shipped TinyCLIP directory (``CLIPModel.from_pretrained`` format)."""
    return _existing(os.path.join(ASSETS, "tinyclip"))


def _existing(path: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"embedded weights missing: {path} does not exist (the package was installed "
                                f"without its package data, or examples/mm/stable_diffusion/pretrain_embedded.py "
                                f"has not been run)")
    return path


def build_vae():
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(**VAE_CONFIG)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def build_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def build_tinyclip():
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig(text_config=TINYCLIP_TEXT, vision_config=TINYCLIP_VISION,
                                projection_dim=TINYCLIP_PROJECTION))


def load_tinyclip(path: str = None):
    """TinyCLIP as a float32 ``CLIPModel`` in eval mode (weights are stored in float16)."""
    from transformers import CLIPModel

    path = path or tinyclip_path()
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"TinyCLIP: {path!r} has no config.json (expected a CLIPModel directory "
                                f"saved with save_pretrained)")
    model = CLIPModel.from_pretrained(path, local_files_only=True)
    return model.float().eval()


def tinyclip_image_features(model, images: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [0, 1] → unnormalised embeddings ``[B, P]``, differentiable.

    Resizes to the model's image size (bilinear) and applies CLIP's mean/std, as the processor would.
    """
    size = model.config.vision_config.image_size
    x = images.float()
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                            antialias=True)
    mean = x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    pooled = model.vision_model(pixel_values=(x - mean) / std).pooler_output
    return model.visual_projection(pooled)


def tinyclip_text_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor = None) -> torch.Tensor:
    """Token ids ``[B, L]`` → unnormalised embeddings ``[B, P]``."""
    pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    return model.text_projection(pooled)
