"""Stable Diffusion XL behind the :class:`~.base.DiffusionBackend` interface.

Only the prompt → UNet conditioning differs from SD (:mod:`.sd`); sampling, CFG, LoRA, the reference, decoding and
every objective are the shared ones. SDXL conditions its UNet on

* ``encoder_hidden_states`` ``[B, 77, D1 + D2]``: the *penultimate* hidden states of both text
  encoders (``CLIPTextModel``, then ``CLIPTextModelWithProjection``) concatenated along features;
* ``added_cond_kwargs["text_embeds"]`` ``[B, P]``: the pooled, projected embedding of encoder 2;
* ``added_cond_kwargs["time_ids"]`` ``[B, 6]``: (orig_h, orig_w, crop_top, crop_left, target_h,
  target_w) in pixels. We train on uncropped images generated at the target resolution, so this is
  ``(H, W, 0, 0, H, W)`` — what diffusers' SDXL pipeline uses by default for an ``H×W`` generation.
  Set it with :meth:`SDXLBackend.set_resolution` from ``model.infer.{height,width}``.

The unconditional branch is all zeros (embeddings and pooled embedding; the time ids stay) when the
pipeline's ``force_zeros_for_empty_prompt`` is set, as in SDXL base; otherwise it is the empty prompt.

Sampling uses the Euler (EDM, Karras et al. 2022 Alg. 1 first-order) rule,
:class:`~..core.schedulers.EulerRule`, in σ-space: x_σ = x̂0 + σ·n. The "noise" DRaFT+ regularises
is EDM's d = (x − D(x))/σ, the quantity NeMo-Aligner penalises for SDXL, compared between policy and
reference on the same x. What d is:

* ε-prediction (SDXL base): D(x) = x − σ·ε̂, so d = ε̂ exactly — the same penalty as SD's.
* v-prediction: the UNet sees x_in = x/√(σ²+1) = √ᾱ·x0 + √(1−ᾱ)·n with ᾱ = 1/(1+σ²), and
  D(x) = √ᾱ·x_in − √(1−ᾱ)·v̂. Then d = √ᾱ·v̂ + √(1−ᾱ)·x_in, which is the ε implied by v̂ (the
  same formula the DDIM rule uses): the penalty is on the implied ε for either prediction type.

Memory: the VAE encoder is dropped (base class). SDXL's VAE config sets ``force_upcast`` (its fp16
activations overflow), so the VAE stays in fp32 whatever ``frozen_dtype`` is, and decoding runs in
fp32. Activation checkpointing: :meth:`~.base.DiffusionBackend.set_activation_checkpointing`.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .base import check_pipeline_dir, load_vae
from .sd import SDBackend

NUM_TIME_IDS = 6
SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


class SDXLBackend(SDBackend):
    """SDXL (two CLIP text encoders, pooled text + size/crop time-id conditioning), Euler sampler.

    ``resolution``: (height, width) in pixels for the time ids; defaults to the UNet's native
    ``sample_size × vae_scale_factor`` (1024×1024 for SDXL base) until :meth:`set_resolution`.
    """

    family = "sdxl"

    def __init__(self, unet, vae, text_encoders: Sequence, tokenizers: Sequence, scheduler,
                 frozen_dtype: torch.dtype = torch.float32, force_zeros_for_empty_prompt: bool = True,
                 resolution: Optional[Tuple[int, int]] = None):
        if len(text_encoders) != 2 or len(tokenizers) != 2:
            raise ValueError(f"SDXL needs 2 text encoders and 2 tokenizers, got {len(text_encoders)} "
                             f"and {len(tokenizers)}")
        super().__init__(unet, vae, text_encoders, tokenizers, scheduler, frozen_dtype)
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self._check_added_conditioning()
        if resolution is None:
            native = int(unet.config.sample_size) * self.vae_scale_factor
            resolution = (native, native)
        self.set_resolution(*resolution)

    def _vae_dtype(self, frozen_dtype: torch.dtype) -> torch.dtype:
        # SDXL's VAE overflows in fp16: its config's force_upcast asks for fp32 weights and decoding
        return torch.float32 if getattr(self.vae.config, "force_upcast", False) else frozen_dtype

    def _check_added_conditioning(self) -> None:
        cfg = self.net.config
        if cfg.addition_embed_type != "text_time":
            raise ValueError(f"SDXL UNet must have addition_embed_type='text_time', got "
                             f"{cfg.addition_embed_type!r} (is this an SD 1.x/2.x UNet? use family 'sd')")
        proj = int(self.text_encoders[1].config.projection_dim)
        expected = int(self.net.add_embedding.linear_1.in_features)
        got = int(cfg.addition_time_embed_dim) * NUM_TIME_IDS + proj
        if got != expected:
            raise ValueError(f"SDXL UNet add_embedding expects {expected} inputs but addition_time_embed_dim "
                             f"{cfg.addition_time_embed_dim} × {NUM_TIME_IDS} + text_encoder_2 projection_dim "
                             f"{proj} = {got}")

    def set_resolution(self, height: int, width: int, original=None, crop=(0, 0)) -> None:
        """Time ids for ``height × width`` pixel generations: (orig_h, orig_w, crop_top, crop_left, H, W);
        the original size defaults to the target size and the crop to (0, 0), diffusers' SDXL defaults."""
        h, w = int(height), int(width)
        if h <= 0 or w <= 0:
            raise ValueError(f"SDXL resolution must be positive, got {height}×{width}")
        oh, ow = (int(original[0]), int(original[1])) if original is not None else (h, w)
        self.time_ids = (oh, ow, int(crop[0]), int(crop[1]), h, w)
        self._uncond_cache = None  # it holds the old time ids

    # ----------------------------------------------------------------- prompts
    def _encode(self, prompts: List[str]) -> Dict:
        hidden = []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            out = encoder(self._tokenize(tokenizer, prompts), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        pooled = out.text_embeds  # encoder 2's projected pooled output, [B, P]
        embeds = torch.cat(hidden, dim=-1)
        time_ids = torch.tensor([self.time_ids], dtype=embeds.dtype, device=embeds.device)
        return {
            "encoder_hidden_states": embeds,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)},
        }

    def _encode_uncond(self) -> Dict:
        empty = self._encode([""])
        if not self.force_zeros_for_empty_prompt:
            return empty
        added = empty["added_cond_kwargs"]
        return {
            "encoder_hidden_states": torch.zeros_like(empty["encoder_hidden_states"]),
            "added_cond_kwargs": {"text_embeds": torch.zeros_like(added["text_embeds"]),
                                  "time_ids": added["time_ids"]},
        }

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str, frozen_dtype: torch.dtype = torch.float32) -> "SDXLBackend":
        """Load a local diffusers SDXL pipeline directory (``StableDiffusionXLPipeline.save_pretrained``
        layout: unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler)."""
        from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        check_pipeline_dir(path)
        missing = [c for c in SDXL_COMPONENTS if not os.path.isdir(os.path.join(path, c))]
        if missing:
            raise FileNotFoundError(f"SDXL pipeline directory {path!r} lacks the "
                                    f"subfolder(s) {missing} (expected {list(SDXL_COMPONENTS)})")
        with open(os.path.join(path, "model_index.json")) as f:
            force_zeros = json.load(f).get("force_zeros_for_empty_prompt", True)

        def load(model_cls, sub):
            return model_cls.from_pretrained(path, subfolder=sub, local_files_only=True)

        return cls(
            load(UNet2DConditionModel, "unet"), load_vae(path),
            [load(CLIPTextModel, "text_encoder"), load(CLIPTextModelWithProjection, "text_encoder_2")],
            [load(CLIPTokenizer, "tokenizer"), load(CLIPTokenizer, "tokenizer_2")],
            load(EulerDiscreteScheduler, "scheduler"), frozen_dtype, force_zeros_for_empty_prompt=force_zeros,
        )
