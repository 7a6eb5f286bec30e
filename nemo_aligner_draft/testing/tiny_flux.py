"""A tiny random FLUX pipeline, saved as a real diffusers ``FluxPipeline`` directory.

The architecture is FLUX.1's, shrunk: a ``FluxTransformer2DModel`` with one double-stream (joint) block and
one single-stream block over packed 2×2 latent patches (``in_channels`` = 4 × the VAE's latent channels), a
CLIP text encoder whose pooled output feeds ``pooled_projections``, a T5 encoder whose last hidden state is
the token sequence (``joint_attention_dim`` = T5's width), an ``AutoencoderKL`` with FLUX's scaling and shift
factors and no quant convs, and a ``FlowMatchEulerDiscreteScheduler`` with FLUX.1-dev's configuration
(resolution-dependent dynamic shifting). ``guidance_embeds=True`` is FLUX.1-dev (guidance distilled: the
scale is an input of the transformer), ``False`` FLUX.1-schnell.

The two text encoders have different widths (CLIP 32, T5 48) so that swapping them changes shapes. The T5
tokenizer is built in code (:func:`t5_tokenizer`): a character-level Unigram vocabulary, nothing downloaded.
"""
from __future__ import annotations

import string

import torch

from .tiny import TINY_TEXT, TINY_VAE, clip_tokenizer

LATENT_CHANNELS = 4  # FLUX.1 has 16; the transformer sees 2×2 patches of them: in_channels = 4 × this
HEAD_DIM = 16
# the rotary embedding splits each head's dimensions over (text/index, row, column) positions; the axes
# must sum to the head dimension and be even (FLUX.1: (16, 56, 56) for heads of 128)
AXES_DIMS_ROPE = (4, 6, 6)

# CLIPTextModel: only the pooled output is used (pooled_projection_dim = its width)
CLIP_TEXT = dict(TINY_TEXT)
# T5EncoderModel in the v1.1 layout FLUX uses (gated-GELU feed-forward, untied head irrelevant for an encoder)
T5_TEXT = dict(d_model=48, d_kv=8, d_ff=64, num_layers=1, num_heads=4, relative_attention_num_buckets=8,
               relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dropout_rate=0.0,
               tie_word_embeddings=False)
T5_MAX_LENGTH = 512  # FLUX.1-dev's tokenizer_2 model_max_length (the pipeline's max_sequence_length cap)

TINY_FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=4 * LATENT_CHANNELS,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=HEAD_DIM,
    num_attention_heads=2,
    joint_attention_dim=T5_TEXT["d_model"],
    pooled_projection_dim=CLIP_TEXT["hidden_size"],
    axes_dims_rope=AXES_DIMS_ROPE,
)

# black-forest-labs/FLUX.1-dev vae/config.json: scaling and shift factors, no quant/post-quant convolutions
TINY_FLUX_VAE = dict(TINY_VAE, latent_channels=LATENT_CHANNELS, scaling_factor=0.3611, shift_factor=0.1159,
                     use_quant_conv=False, use_post_quant_conv=False)

# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                      max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def t5_tokenizer():
    """A ``T5TokenizerFast`` over a tiny character-level Unigram vocabulary, T5's special tokens first
    (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2) and no sentinel tokens. ``save_pretrained`` writes its
    ``tokenizer.json``, which ``FluxPipeline.from_pretrained`` loads back offline."""
    from transformers import T5TokenizerFast

    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,;:!?'\"-()"
    # word-initial pieces ("▁a") score above the bare characters, so words start with one of them
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def build_tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer_2 = t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER, guidance_embeds=guidance_embeds)
    vae = AutoencoderKL(**TINY_FLUX_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT))
    text_encoder_2 = T5EncoderModel(T5Config(**T5_TEXT, vocab_size=len(tokenizer_2)))
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


def save_tiny_flux(path: str, seed: int = 0, guidance_embeds: bool = True) -> str:
    """Build and save a tiny FLUX pipeline directory at ``path``; returns ``path``."""
    build_tiny_flux_pipeline(seed, guidance_embeds).save_pretrained(path, safe_serialization=True)
    return path
