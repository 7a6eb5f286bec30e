"""Published architectures at full size with random weights, built from config dicts (nothing is
downloaded): SD1.5, SDXL-base, SD3.5-Medium and FLUX.1 pipelines and the CLIP towers of the reward models.

Sources of the numbers: the ``config.json`` files of the diffusers repositories
``stable-diffusion-v1-5/stable-diffusion-v1-5`` (unet/, vae/, text_encoder/),
``stabilityai/stable-diffusion-xl-base-1.0`` (unet/, vae/, text_encoder/, text_encoder_2/),
``stabilityai/stable-diffusion-3.5-medium`` (transformer/, vae/, text_encoder/ CLIP-L, text_encoder_2/
CLIP-G, text_encoder_3/ T5-XXL) and ``black-forest-labs/FLUX.1-dev`` / ``-schnell`` (transformer/, vae/,
text_encoder/ CLIP-L, text_encoder_2/ T5-XXL); the HF ``CLIPModel`` configs of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (PickScore's and HPSv2's backbone) and
``openai/clip-vit-large-patch14`` (the LAION aesthetic predictor's embedding, 768-d).
tests/testing/test_realsize_configs.py checks the parameter counts against the published ones.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

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
# SD3.5-Medium (MMDiT-X): 24 joint blocks, the first 13 with the extra image self-attention, RMS q/k norm
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)),
)
# the 16-channel VAE of SD3 and FLUX (no quant convs); the two differ in scaling and shift only
SD3_VAE = dict(SD15_VAE, latent_channels=16, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
               scaling_factor=1.5305, shift_factor=0.0609, force_upcast=True)
FLUX_VAE = dict(SD3_VAE, scaling_factor=0.3611, shift_factor=0.1159, force_upcast=True)
SD3_CLIP_L = dict(SD15_TEXT)  # CLIPTextModelWithProjection: SD3/FLUX's text_encoder (ViT-L/14's text tower)
SD3_CLIP_G = dict(SDXL_TEXT_2)  # OpenCLIP bigG's text tower, projection 1280
# google/t5-v1_1-xxl's encoder: text_encoder_3 of SD3, text_encoder_2 of FLUX
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
              dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)
# FLUX.1-dev: 19 double-stream and 38 single-stream blocks, 3072 wide, guidance embedding (schnell: none)
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_SCHNELL_TRANSFORMER = dict(FLUX_DEV_TRANSFORMER, guidance_embeds=False)

REWARD_CLIPS: Dict[str, dict] = {"pickscore": CLIP_VIT_H_14, "hpsv2": CLIP_VIT_H_14, "aesthetic": CLIP_VIT_L_14}


def build_pipeline(family: str, seed: int = 0, with_t5: bool = True, depth: Optional[Tuple[int, int]] = None,
                   t5_layers: Optional[int] = None):
    """A diffusers ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` / ``StableDiffusion3Pipeline``
    (``family="sd3"``: SD3.5-Medium) / ``FluxPipeline`` (``"flux"``: FLUX.1-dev) of the published shapes,
    random weights, float32. ``with_t5=False`` (sd3 only): no T5 encoder, the pipeline's own T5-less mode
    (T5's part of the prompt is zeros of the same length, so the transformer's work is unchanged).
    ``depth`` (flux only): (double, single) block counts instead of (19, 38), every width as published — for
    measuring what one block adds on a machine that cannot hold the 12 B model. ``t5_layers``: T5 blocks
    instead of 24, its width and vocabulary as published (the encoder is frozen and runs once per prompt: its
    depth changes its weights, which the memory model counts exactly, not the transformer's work)."""
    if family in ("sd3", "flux"):
        return _build_flow_pipeline(family, seed, with_t5, depth, t5_layers)
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
    raise ValueError(f"family must be 'sd', 'sdxl', 'sd3' or 'flux', got {family!r}")


def _build_flow_pipeline(family: str, seed: int, with_t5: bool, depth, t5_layers):
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from .tiny import clip_tokenizer
    from .tiny_flux import FLUX_SCHEDULER  # the published scheduler configs (fixed shift 3; dynamic for FLUX)
    from .tiny_sd3 import SD3_SCHEDULER, t5_tokenizer

    torch.manual_seed(seed)
    t5_tok = t5_tokenizer(512 if family == "flux" else 256)  # a small vocabulary: its ids fit T5's 32128
    t5 = T5Config(**dict(T5_XXL, **({} if t5_layers is None else {"num_layers": int(t5_layers)})))
    if family == "sd3":
        return StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**SD35M_TRANSFORMER), vae=AutoencoderKL(**SD3_VAE),
            text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**SD3_CLIP_L)), tokenizer=clip_tokenizer(),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**SD3_CLIP_G)), tokenizer_2=clip_tokenizer(),
            text_encoder_3=T5EncoderModel(t5) if with_t5 else None,
            tokenizer_3=t5_tok if with_t5 else None, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER))
    spec = dict(FLUX_DEV_TRANSFORMER)
    if depth is not None:
        spec.update(num_layers=int(depth[0]), num_single_layers=int(depth[1]))
    return FluxPipeline(
        transformer=FluxTransformer2DModel(**spec), vae=AutoencoderKL(**FLUX_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD3_CLIP_L)), tokenizer=clip_tokenizer(),
        text_encoder_2=T5EncoderModel(t5), tokenizer_2=t5_tok,
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER))


def save_pipeline(family: str, path: str, dtype: torch.dtype = torch.float16, **options) -> str:
    """Save :func:`build_pipeline` as a diffusers directory (``dtype`` on disk; fp16 as the hub ships).
    ``options``: :func:`build_pipeline`'s ``with_t5``, ``depth`` and ``t5_layers``."""
    pipe = build_pipeline(family, **options)
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
