"""FLUX.1 (dev and schnell) behind :class:`~.base.DiffusionBackend`, as diffusers' ``FluxPipeline`` runs it.

Conditioning (``FluxPipeline.encode_prompt``): the token sequence is the T5 encoder's last hidden state
``[B, L, D_t5]`` with ``L = max_sequence_length`` (the pipeline's default 512, a constructor argument here);
``pooled_projections`` ``[B, D_clip]`` is the CLIP text model's pooled output. The text position ids are
zeros ``[L, 3]`` and the image position ids ``(0, row, column)`` of each 2×2 patch; both are made inside
:meth:`FluxBackend._net_call`, since they carry no batch dimension.

Latents: the sampler, x̂0, decoding and every objective see FLUX's VAE latents unpacked, ``[B, C, h, w]``
(the core's shape contract). The transformer works on sequences of 2×2 patches, ``[B, h/2 · w/2, 4C]``:
:func:`pack_latents` / :func:`unpack_latents` (the layout of ``FluxPipeline._pack_latents`` /
``_unpack_latents``) wrap every transformer call. The rectified-flow Euler step is elementwise, so running it
on unpacked latents gives the pipeline's packed result, permuted.

Time: the transformer takes σ = t / 1000 (it multiplies by 1000 itself), and the guidance scale in the same
units. The schedule is the pipeline's: ``sigmas = linspace(1, 1/n, n)`` shifted with
``mu = calculate_shift(image sequence length)`` (:func:`calculate_shift`), the sequence length being the
number of 2×2 patches at the resolution set by :meth:`FluxBackend.set_resolution`.

Guidance: FLUX.1-dev (``guidance_embeds=True``) is guidance distilled: the scale w is an input of the
transformer and there is one call per step, no unconditional batch. FLUX.1-schnell has no guidance
embedding: the scale must be 1. Classifier-free guidance with the empty negative prompt (the pipeline's
``true_cfg_scale``) is a separate constructor option, ``true_cfg_scale`` > 1.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core.schedulers import StepRule, build_step_rule
from .base import Conditioning, DiffusionBackend, _cat, check_pipeline_dir, load_vae

FLUX_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
FLUX_PIPELINES = ("FluxPipeline",)
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default and its cap (check_inputs)
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: latents of 128 → 1024 px with FLUX's ×8 VAE


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` → ``[B, h/2 · w/2, 4C]``: each 2×2 patch one token, patches in row-major order,
    a token's features ordered (channel, row in patch, column in patch) — ``FluxPipeline._pack_latents``."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX latents need an even height and width (2×2 patches), got {h}×{w}")
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`: ``[B, h/2 · w/2, 4C]`` → ``[B, C, h, w]`` (latent h, w)."""
    b, n, d = tokens.shape
    if n != (h // 2) * (w // 2) or d % 4:
        raise ValueError(f"cannot unpack {n} tokens of width {d} into {h}×{w} latents")
    return tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def latent_image_ids(h: int, w: int, device=None) -> torch.Tensor:
    """Position ids ``[h/2 · w/2, 3]`` of the packed tokens: (0, patch row, patch column)."""
    rows = torch.arange(h // 2, dtype=torch.float32).view(-1, 1).expand(h // 2, w // 2)
    cols = torch.arange(w // 2, dtype=torch.float32).view(1, -1).expand(h // 2, w // 2)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)
    return ids.reshape(-1, 3).to(device)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's time-shift parameter μ, linear in the number of image tokens: ``base_shift`` at
    ``base_seq_len`` tokens, ``max_shift`` at ``max_seq_len`` (evaluated as slope·len + intercept, the
    pipeline's order of operations, so the schedule matches it to the last bit)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    intercept = base_shift - slope * base_seq_len
    return image_seq_len * slope + intercept


class FluxBackend(DiffusionBackend):
    """FLUX.1 (T5 + CLIP pooled conditioning, packed latents, embedded guidance), flow-matching sampler.

    ``max_sequence_length``: T5 tokens (≤ 512). ``resolution``: (height, width) in pixels for the schedule's
    shift, the pipeline's 1024×1024 default until :meth:`set_resolution`. ``true_cfg_scale`` > 1: also run
    the empty prompt and combine out_u + s·(out_c − out_u) (the pipeline's ``true_cfg_scale`` with
    ``negative_prompt=""``), on top of the embedded guidance of dev models.
    """

    family = "flux"
    default_sampler = "flow"

    def __init__(self, transformer, vae, text_encoders: Sequence, tokenizers: Sequence, scheduler,
                 frozen_dtype: torch.dtype = torch.float32, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                 resolution: Optional[Tuple[int, int]] = None, true_cfg_scale: float = 1.0):
        if len(text_encoders) != 2 or len(tokenizers) != 2:
            raise ValueError(f"FLUX needs 2 text encoders (CLIP, T5) and 2 tokenizers, got {len(text_encoders)} "
                             f"and {len(tokenizers)}")
        if not 0 < int(max_sequence_length) <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"FLUX max_sequence_length must be in [1, {MAX_SEQUENCE_LENGTH}], got {max_sequence_length}")
        if float(true_cfg_scale) < 1.0:
            raise ValueError(f"FLUX true_cfg_scale must be ≥ 1 (1 = off), got {true_cfg_scale}")
        super().__init__(transformer, vae, text_encoders, tokenizers, scheduler, frozen_dtype)
        self.max_sequence_length = int(max_sequence_length)
        self.true_cfg_scale = float(true_cfg_scale)
        self._check_widths()
        if resolution is None:
            native = DEFAULT_SAMPLE_SIZE * self.vae_scale_factor
            resolution = (native, native)
        self.set_resolution(*resolution)

    @property
    def transformer(self):
        """The family's name for :attr:`net`."""
        return self.net

    @property
    def has_guidance_embeds(self) -> bool:
        """FLUX.1-dev style: the guidance scale is an input of the transformer."""
        return bool(self.net.config.guidance_embeds)

    @property
    def latent_channels(self) -> int:
        # the transformer's input is a 2×2 patch of latents: 4 × the VAE's channels
        return int(self.net.config.in_channels) // 4

    def _check_widths(self) -> None:
        cfg = self.net.config
        clip, t5 = self.text_encoders
        checks = [("in_channels", int(cfg.in_channels), 4 * int(self.vae.config.latent_channels),
                   "4 × vae latent_channels"),
                  ("joint_attention_dim", int(cfg.joint_attention_dim), int(t5.config.d_model), "text_encoder_2 d_model"),
                  ("pooled_projection_dim", int(cfg.pooled_projection_dim), int(clip.config.hidden_size),
                   "text_encoder hidden_size")]
        for name, got, want, what in checks:
            if got != want:
                raise ValueError(f"FLUX transformer {name} is {got} but {what} is {want}")

    def set_resolution(self, height: int, width: int, original=None, crop=(0, 0)) -> None:
        """Output size in pixels: it sets the number of image tokens and so the schedule's shift μ.
        (``original``/``crop`` are SDXL's micro-conditioning; FLUX has none and ignores them.)"""
        h, w = int(height), int(width)
        step = 2 * self.vae_scale_factor
        if h <= 0 or w <= 0 or h % step or w % step:
            raise ValueError(f"FLUX resolution must be a positive multiple of {step} px (×{self.vae_scale_factor} VAE, "
                             f"2×2 patches), got {height}×{width}")
        self.resolution = (h, w)

    @property
    def image_seq_len(self) -> int:
        h, w = self.resolution
        return (h // self.vae_scale_factor // 2) * (w // self.vae_scale_factor // 2)

    # ----------------------------------------------------------------- schedule
    def step_rule(self, num_steps: int, sampler: Optional[str] = None) -> StepRule:
        """The pipeline's schedule for ``num_steps`` at the current resolution: sigmas linspace(1, 1/n, n)
        (left to the scheduler when its config has ``use_flow_sigmas``) shifted by μ(image tokens)."""
        sampler = sampler or self.default_sampler
        if sampler != "flow":
            raise ValueError(f"FLUX is a flow-matching model: its sampler is 'flow', got {sampler!r}")
        n = int(num_steps)
        cfg = self.scheduler.config
        sigmas = None if cfg.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / n, n)
        mu = calculate_shift(self.image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        rule = build_step_rule(self.scheduler, n, "flow", sigmas=sigmas, mu=mu)
        rule.resolution = self.resolution  # checked by initial_latents: μ depends on it
        return rule

    def initial_latents(self, batch: int, height: int, width: int, rule: StepRule,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
        built_for = getattr(rule, "resolution", None)
        if built_for is not None and built_for != (int(height), int(width)):
            raise ValueError(f"the FLUX step rule was built for {built_for[0]}×{built_for[1]} px, not {height}×{width}: "
                             f"call set_resolution({height}, {width}) before step_rule (the schedule's shift depends on it)")
        return super().initial_latents(batch, height, width, rule, generator)

    # ----------------------------------------------------------------- prompts
    def _encode(self, prompts: List[str]) -> Dict:
        clip, t5 = self.text_encoders
        pooled = clip(self._tokenize(self.tokenizers[0], prompts)).pooler_output
        ids = self.tokenizers[1](list(prompts), padding="max_length", max_length=self.max_sequence_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)
        return {"encoder_hidden_states": t5(ids)[0], "pooled_projections": pooled}

    # ----------------------------------------------------------------- the network
    def _net_call(self, net, x: torch.Tensor, t: torch.Tensor, conditioning: Dict) -> torch.Tensor:
        """One transformer call on unpacked latents ``x`` ``[B, C, h, w]`` at timestep ``t`` (σ·1000, a
        scalar or ``[B]``); ``conditioning`` holds the text tensors and, for dev models, ``guidance`` ``[B]``.
        Returns the velocity, unpacked, ``[B, C, h, w]``."""
        b, _, h, w = x.shape
        t = torch.as_tensor(t, device=x.device)
        timestep = (t.expand(b) if t.ndim == 0 else t).to(x.dtype)
        text = conditioning["encoder_hidden_states"]
        out = net(hidden_states=pack_latents(x), timestep=timestep / 1000, guidance=conditioning.get("guidance"),
                  pooled_projections=conditioning["pooled_projections"], encoder_hidden_states=text,
                  txt_ids=torch.zeros(text.shape[1], 3, device=x.device), img_ids=latent_image_ids(h, w, x.device),
                  return_dict=False)[0]
        return unpack_latents(out, h, w)

    def check_guidance_scale(self, guidance_scale: float) -> None:
        if not self.has_guidance_embeds and float(guidance_scale) != 1.0:
            raise ValueError(f"this FLUX transformer has no guidance embedding (guidance_embeds=False, as FLUX.1-schnell): "
                             f"the guidance scale (model.infer.unconditional_guidance_scale) must be 1.0, "
                             f"got {float(guidance_scale)}")

    def denoiser(self, cond: Conditioning, guidance_scale: float, net=None):
        """A :data:`~..core.sampler.Denoiser`: one transformer call with ``guidance = w`` for models with a
        guidance embedding; models without one take w = 1 only. With ``true_cfg_scale`` s > 1 the empty
        prompt runs in the same batch and the outputs combine as out_u + s·(out_c − out_u).
        ``grad_tensors`` as in :meth:`.base.DiffusionBackend.denoiser` (exact step checkpointing)."""
        from ..core.sampler import tensors_requiring_grad

        net = net if net is not None else self.net
        w = float(guidance_scale)
        if self.has_guidance_embeds:
            def with_guidance(c):
                b = int(c["encoder_hidden_states"].shape[0])
                return dict(c, guidance=torch.full((b,), w, dtype=torch.float32, device=self.device))
        elif w != 1.0:
            self.check_guidance_scale(w)
        else:
            def with_guidance(c):
                return c
        s = self.true_cfg_scale
        conditioning = with_guidance(cond.cond) if s == 1.0 else _cat(with_guidance(cond.uncond),
                                                                      with_guidance(cond.cond))

        def fn(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if s == 1.0:
                return self._net_call(net, x_in, t, conditioning)
            t2 = torch.cat([t, t]) if torch.is_tensor(t) and t.ndim else t
            out_u, out_c = self._net_call(net, torch.cat([x_in, x_in]), t2, conditioning).chunk(2)
            return out_u + s * (out_c - out_u)

        if self.exact_step_checkpoint:
            fn.grad_tensors = lambda: tensors_requiring_grad(net.parameters(), conditioning)
        return fn

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str, frozen_dtype: torch.dtype = torch.float32, **kwargs) -> "FluxBackend":
        """Load a local diffusers ``FluxPipeline`` directory (``save_pretrained`` layout: transformer, vae,
        text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler). ``kwargs``: the constructor's
        options (``max_sequence_length``, ``resolution``, ``true_cfg_scale``)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        index = check_pipeline_dir(path)
        name = index.get("_class_name")
        if name not in FLUX_PIPELINES:
            raise ValueError(f"{path!r} is not a FLUX pipeline: model_index.json names _class_name {name!r} "
                             f"(expected one of {list(FLUX_PIPELINES)}; leave the family on 'auto' to detect it)")
        missing = [c for c in FLUX_COMPONENTS if not os.path.isdir(os.path.join(path, c))]
        if missing:
            raise FileNotFoundError(f"FLUX pipeline directory {path!r} lacks the subfolder(s) {missing} "
                                    f"(expected {list(FLUX_COMPONENTS)})")
        config = os.path.join(path, "transformer", "config.json")
        try:
            with open(config) as f:
                net_class = json.load(f).get("_class_name")
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"FLUX transformer config {config!r} is missing or not JSON ({e})") from None
        if net_class != "FluxTransformer2DModel":
            raise ValueError(f"{config}: _class_name {net_class!r}, expected 'FluxTransformer2DModel'")

        def load(model_cls, sub):
            return model_cls.from_pretrained(path, subfolder=sub, local_files_only=True)

        return cls(
            load(FluxTransformer2DModel, "transformer"), load_vae(path),
            [load(CLIPTextModel, "text_encoder"), load(T5EncoderModel, "text_encoder_2")],
            [load(CLIPTokenizer, "tokenizer"), load(T5TokenizerFast, "tokenizer_2")],
            load(FlowMatchEulerDiscreteScheduler, "scheduler"), frozen_dtype, **kwargs,
        )
