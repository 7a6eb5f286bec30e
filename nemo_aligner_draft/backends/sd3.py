"""Stable Diffusion 3 / 3.5 behind :class:`~.base.DiffusionBackend`, as diffusers' ``StableDiffusion3Pipeline``
runs it.

Conditioning (``StableDiffusion3Pipeline.encode_prompt``), for ``B`` prompts:

* ``encoder_hidden_states`` ``[B, 77 + L, D_t5]``: the *penultimate* hidden states of CLIP-L and CLIP-G
  (both ``CLIPTextModelWithProjection``, each padded to 77 tokens) concatenated along features, zero-padded to
  T5's width, then T5's last hidden state (``L = max_sequence_length`` tokens, the pipeline's default 256)
  appended along the sequence. Without a T5 encoder (``text_encoder_3`` null in ``model_index.json``, or
  ``use_t5=False``) T5's part is zeros ``[B, L, joint_attention_dim]``, as the pipeline makes it.
* ``pooled_projections`` ``[B, P_L + P_G]``: both CLIPs' projected pooled outputs, concatenated.

The unconditional branch is the encoding of the empty prompt by all three encoders: the pipeline's negative
prompt defaults to ``""`` and is encoded, never zeroed (SD3 has no ``force_zeros_for_empty_prompt``).

Time: the transformer is given the scheduler's timesteps, t = σ · num_train_timesteps (σ ∈ (0, 1]), one per
sample. The schedule is ``FlowMatchEulerDiscreteScheduler.set_timesteps(n)`` with the config's fixed shift
(3.0 for SD3 / 3.5), or, when the config sets ``use_dynamic_shifting``, with ``mu`` from the number of image
tokens at the resolution of :meth:`SD3Backend.set_resolution` (:func:`calculate_shift`), as the pipeline does.
The sampler is the rectified-flow rule (:class:`~..core.schedulers.FlowMatchRule`): the network predicts the
velocity v = ε − x0; the DRaFT+ penalty compares velocities.

Latents are the VAE's 16 channels at 1/8 of the image size, ``[B, 16, H/8, W/8]``; decoding applies the VAE's
scaling and shift (base class). SD3's VAE config sets ``force_upcast``: the VAE stays in fp32.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..core.schedulers import StepRule, build_step_rule
from .base import DiffusionBackend, check_pipeline_dir, load_vae

SD3_PIPELINES = ("StableDiffusion3Pipeline",)
SD3_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
T5_COMPONENTS = ("text_encoder_3", "tokenizer_3")
MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline.__call__'s default max_sequence_length


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.16) -> float:
    """The dynamic-shifting ``mu`` (log of the time shift): linear in the number of image tokens, ``base_shift``
    at ``base_seq_len`` tokens and ``max_shift`` at ``max_seq_len`` (defaults: the SD3 pipeline's fallbacks)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


class SD3Backend(DiffusionBackend):
    """SD3's MMDiT with CLIP-L + CLIP-G (+ optional T5) conditioning, rectified-flow sampler.

    ``text_encoders`` / ``tokenizers``: [CLIP-L, CLIP-G] or [CLIP-L, CLIP-G, T5]. ``resolution``: (height, width)
    in pixels, used for the dynamic shift only; defaults to the transformer's ``sample_size × vae_scale_factor``
    (the pipeline's default size) until :meth:`set_resolution`."""

    family = "sd3"
    default_sampler = "flow"

    def __init__(self, transformer, vae, text_encoders: Sequence, tokenizers: Sequence, scheduler,
                 frozen_dtype: torch.dtype = torch.float32, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                 resolution: Optional[Tuple[int, int]] = None):
        if len(text_encoders) not in (2, 3) or len(tokenizers) != len(text_encoders):
            raise ValueError(f"SD3 needs 2 CLIP text encoders and optionally a T5 encoder, with one tokenizer "
                             f"each; got {len(text_encoders)} encoders and {len(tokenizers)} tokenizers")
        super().__init__(transformer, vae, text_encoders, tokenizers, scheduler, frozen_dtype)
        if int(max_sequence_length) <= 0:
            raise ValueError(f"max_sequence_length must be positive, got {max_sequence_length}")
        self.max_sequence_length = int(max_sequence_length)
        self._check_widths()
        if resolution is None:
            native = int(transformer.config.sample_size) * self.vae_scale_factor
            resolution = (native, native)
        self.set_resolution(*resolution)

    @property
    def transformer(self):
        """The family's name for :attr:`net`."""
        return self.net

    @property
    def t5(self):
        return self.text_encoders[2] if len(self.text_encoders) == 3 else None

    def _vae_dtype(self, frozen_dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if getattr(self.vae.config, "force_upcast", False) else frozen_dtype

    def _check_widths(self) -> None:
        cfg = self.net.config
        clip_l, clip_g = self.text_encoders[0].config, self.text_encoders[1].config
        joint = int(cfg.joint_attention_dim)
        if self.t5 is not None and int(self.t5.config.d_model) != joint:
            raise ValueError(f"SD3 transformer joint_attention_dim {joint} != text_encoder_3 (T5) d_model "
                             f"{self.t5.config.d_model}")
        clip_width = int(clip_l.hidden_size) + int(clip_g.hidden_size)
        if clip_width > joint:
            raise ValueError(f"SD3 CLIP hidden sizes {clip_l.hidden_size} + {clip_g.hidden_size} exceed the "
                             f"transformer's joint_attention_dim {joint} they are zero-padded to")
        pooled = int(clip_l.projection_dim) + int(clip_g.projection_dim)
        if pooled != int(cfg.pooled_projection_dim):
            raise ValueError(f"SD3 transformer pooled_projection_dim {cfg.pooled_projection_dim} != CLIP projection "
                             f"dims {clip_l.projection_dim} + {clip_g.projection_dim}")
        if int(self.vae.config.latent_channels) != int(cfg.in_channels):
            raise ValueError(f"SD3 transformer in_channels {cfg.in_channels} != VAE latent_channels "
                             f"{self.vae.config.latent_channels}")

    # ----------------------------------------------------------------- resolution and schedule
    def set_resolution(self, height: int, width: int, original=None, crop=(0, 0)) -> None:
        """The image size in pixels the dynamic shift is computed for (``original``/``crop``: SDXL's, unused)."""
        h, w = int(height), int(width)
        step = self.vae_scale_factor * int(self.net.config.patch_size)
        if h <= 0 or w <= 0 or h % step or w % step:
            raise ValueError(f"SD3 resolution must be positive multiples of {step} px (VAE ×{self.vae_scale_factor}, "
                             f"patch {self.net.config.patch_size}), got {height}×{width}")
        self.resolution = (h, w)

    @property
    def image_seq_len(self) -> int:
        """Image tokens at the current resolution: (H/8 / patch) · (W/8 / patch), as the pipeline counts them."""
        p = int(self.net.config.patch_size)
        h, w = (s // self.vae_scale_factor for s in self.resolution)
        return (h // p) * (w // p)

    def step_rule(self, num_steps: int, sampler: Optional[str] = None) -> StepRule:
        """The pipeline's schedule for ``num_steps``: the scheduler's own (fixed shift), or with the dynamic
        shift ``mu`` of the current resolution when the scheduler config asks for it."""
        sampler = sampler or self.default_sampler
        if sampler != "flow":
            raise ValueError(f"SD3 is a flow-matching model: its sampler is 'flow', got {sampler!r}")
        cfg = self.scheduler.config
        if not cfg.get("use_dynamic_shifting", False):
            return build_step_rule(self.scheduler, int(num_steps), "flow")
        mu = calculate_shift(self.image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
        rule = build_step_rule(self.scheduler, int(num_steps), "flow", mu=mu)
        rule.resolution = self.resolution  # checked by initial_latents: mu depends on it
        return rule

    def initial_latents(self, batch: int, height: int, width: int, rule: StepRule,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
        built_for = getattr(rule, "resolution", None)
        if built_for is not None and built_for != (int(height), int(width)):
            raise ValueError(f"the SD3 step rule was built for {built_for[0]}×{built_for[1]} px, not "
                             f"{height}×{width}: call set_resolution({height}, {width}) before step_rule (the "
                             f"dynamic shift depends on it)")
        return super().initial_latents(batch, height, width, rule, generator)

    # ----------------------------------------------------------------- prompts
    def _encode(self, prompts: List[str]) -> Dict:
        clip_max = self.tokenizers[0].model_max_length  # the pipeline pads both CLIPs to tokenizer 1's length
        hidden, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers[:2], self.text_encoders[:2]):
            ids = tokenizer(list(prompts), padding="max_length", max_length=clip_max, truncation=True,
                            return_tensors="pt").input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.cat(hidden, dim=-1)
        t5 = self._encode_t5(prompts, clip)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2),
                "pooled_projections": torch.cat(pooled, dim=-1)}

    def _encode_t5(self, prompts: List[str], like: torch.Tensor) -> torch.Tensor:
        if self.t5 is None:
            width = int(self.net.config.joint_attention_dim)
            return like.new_zeros(len(prompts), self.max_sequence_length, width)
        ids = self.tokenizers[2](list(prompts), padding="max_length", max_length=self.max_sequence_length,
                                 truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
        return self.t5(ids.to(self.device))[0]

    # ----------------------------------------------------------------- the network
    def _net_call(self, net, x: torch.Tensor, t, conditioning: Dict) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])  # the transformer's time embedding takes one timestep per sample
        return net(hidden_states=x, timestep=t, **conditioning).sample

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str, frozen_dtype: torch.dtype = torch.float32, use_t5: bool = True,
                        **kwargs) -> "SD3Backend":
        """Load a local diffusers ``StableDiffusion3Pipeline`` directory (``save_pretrained`` layout: transformer,
        vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler, and text_encoder_3 / tokenizer_3
        unless ``model_index.json`` has them null). ``use_t5=False`` leaves T5 unloaded (zeros for its part, the
        pipeline's ``text_encoder_3=None``). ``kwargs``: the constructor's ``max_sequence_length``, ``resolution``."""
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        index = check_pipeline_dir(path)
        name = index.get("_class_name")
        if name not in SD3_PIPELINES:
            raise ValueError(f"{path!r} is not an SD3 pipeline: model_index.json names _class_name {name!r} "
                             f"(expected one of {list(SD3_PIPELINES)}; leave the family on 'auto' to detect it)")
        has_t5 = [bool(index.get(c) and index[c][0]) for c in T5_COMPONENTS]
        if has_t5[0] != has_t5[1]:
            raise ValueError(f"{path!r}: model_index.json lists only one of {list(T5_COMPONENTS)}; SD3 needs both "
                             f"or neither")
        wanted = list(SD3_COMPONENTS) + (list(T5_COMPONENTS) if has_t5[0] and use_t5 else [])
        missing = [c for c in wanted if not os.path.isdir(os.path.join(path, c))]
        if missing:
            raise FileNotFoundError(f"SD3 pipeline directory {path!r} lacks the subfolder(s) {missing} "
                                    f"(expected {wanted})")

        def load(model_cls, sub):
            return model_cls.from_pretrained(path, subfolder=sub, local_files_only=True)

        encoders = [load(CLIPTextModelWithProjection, "text_encoder"),
                    load(CLIPTextModelWithProjection, "text_encoder_2")]
        tokenizers = [load(CLIPTokenizer, "tokenizer"), load(CLIPTokenizer, "tokenizer_2")]
        if "text_encoder_3" in wanted:
            encoders.append(load(T5EncoderModel, "text_encoder_3"))
            tokenizers.append(load(T5TokenizerFast, "tokenizer_3"))
        return cls(load(SD3Transformer2DModel, "transformer"), load_vae(path), encoders, tokenizers,
                   load(FlowMatchEulerDiscreteScheduler, "scheduler"), frozen_dtype, **kwargs)
