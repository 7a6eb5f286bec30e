"""A tiny random Stable Diffusion 3 pipeline, saved as a real diffusers ``StableDiffusion3Pipeline`` directory.

The architecture is SD3's, shrunk: an MMDiT ``SD3Transformer2DModel`` (2 joint blocks, 2 heads of 8, patch 2,
16 latent channels), two ``CLIPTextModelWithProjection`` encoders (CLIP-L and CLIP-G's roles) over the real
CLIP vocabulary, a ``T5EncoderModel`` in the v1.1 layout (gated-GELU) with a tokenizer built in code, an
``AutoencoderKL`` with SD3's 16 latent channels, scaling and shift, and SD3's ``FlowMatchEulerDiscreteScheduler``.

The widths differ on purpose, so that a mix-up changes shapes rather than numbers: CLIP-L 32 (projection 24),
CLIP-G 48 (projection 40), T5 96 ≥ 32 + 48 (the CLIP states are zero-padded to T5's width, as in the real
model: 768 + 1280 ≤ 4096), pooled projections 24 + 40 = 64.
"""
from __future__ import annotations

import torch

from .tiny import TINY_TEXT, TINY_VAE, clip_tokenizer

CLIP_L = dict(TINY_TEXT, hidden_size=32, intermediate_size=64, projection_dim=24)
CLIP_G = dict(TINY_TEXT, hidden_size=48, intermediate_size=96, projection_dim=40)
# T5 v1.1 (SD3 uses t5-v1_1-xxl): gated-GELU feed-forward, relative position buckets; no dropout
T5_TEXT = dict(d_model=96, d_kv=16, d_ff=128, num_layers=1, num_heads=4, relative_attention_num_buckets=8,
               relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
               is_encoder_decoder=False, use_cache=False)

TINY_SD3_TRANSFORMER = dict(
    sample_size=8,  # latent pixels: 64 px images by default, as 128 × 8 = 1024 px for SD3 medium
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=T5_TEXT["d_model"],
    caption_projection_dim=2 * 8,  # = heads × head_dim: text and image tokens share the joint attention
    pooled_projection_dim=CLIP_L["projection_dim"] + CLIP_G["projection_dim"],
    pos_embed_max_size=16,  # up to 16 patches a side: 256 px
)

# stabilityai/stable-diffusion-3-medium-diffusers vae/config.json: 16 channels, no quant convs
SD3_VAE = dict(TINY_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
# ... and scheduler/scheduler_config.json
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)

_T5_WORDS = ("a", "an", "the", "of", "in", "on", "and", "with", "red", "fox", "snow", "cat", "dog", "photo",
             "astronaut", "riding", "horse", "city", "night", "lake", "mountain", "bowl", "fruit")


def t5_tokenizer(model_max_length: int = 256):
    """A ``T5TokenizerFast`` over a small Unigram vocabulary made here: T5's specials first (``<pad>`` 0,
    ``</s>`` 1, ``<unk>`` 2), then the word-start marker, letters and digits with and without it, and a few
    whole words that score higher, so prompts split into a mix of words and characters. Saved as
    ``tokenizer.json``, which ``StableDiffusion3Pipeline.from_pretrained`` loads back offline."""
    from transformers import T5TokenizerFast

    pieces = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "\u2581": -3.0}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-":
        pieces.setdefault("\u2581" + c, -6.0)
        pieces.setdefault(c, -5.0)
    for w in _T5_WORDS:
        pieces["\u2581" + w] = -2.0
    return T5TokenizerFast(vocab=list(pieces.items()), extra_ids=0, model_max_length=model_max_length)


def build_tiny_sd3_pipeline(seed: int = 0, with_t5: bool = True, dynamic_shifting: bool = False,
                            sd35: bool = False):
    """``with_t5=False``: no ``text_encoder_3``/``tokenizer_3`` (the pipeline then uses zeros for T5's part).
    ``dynamic_shifting``: the scheduler shifts by μ(image tokens) instead of the fixed shift 3.
    ``sd35``: SD3.5's transformer options (RMS q/k norm, a dual-attention first block)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    extra = dict(qk_norm="rms_norm", dual_attention_layers=(0,)) if sd35 else {}
    transformer = SD3Transformer2DModel(**TINY_SD3_TRANSFORMER, **extra)
    vae = AutoencoderKL(**SD3_VAE)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))
    tokenizer_3 = text_encoder_3 = None
    if with_t5:
        tokenizer_3 = t5_tokenizer()
        text_encoder_3 = T5EncoderModel(T5Config(**T5_TEXT, vocab_size=len(tokenizer_3)))
    sched = dict(SD3_SCHEDULER, use_dynamic_shifting=True) if dynamic_shifting else SD3_SCHEDULER
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**sched), vae=vae,
        text_encoder=text_encoder, tokenizer=clip_tokenizer(), text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer(), text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )


def save_tiny_sd3(path: str, seed: int = 0, with_t5: bool = True, dynamic_shifting: bool = False,
                  sd35: bool = False) -> str:
    """Build and save a tiny SD3 pipeline directory at ``path``; returns ``path``."""
    pipe = build_tiny_sd3_pipeline(seed, with_t5, dynamic_shifting, sd35)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
