"""The backend interface every objective talks to, implemented here for Stable Diffusion 1.x/2.x.

A backend owns the diffusers modules and answers five verbs: ``encode_prompts``, ``denoiser``
(a CFG-combined UNet call), ``decode``, ``step_rule`` and ``reference``. SDXL
(:mod:`.sdxl`) differs only in how prompts become UNet conditioning and in its default sampler, so it
overrides ``_encode`` / ``_encode_uncond`` and its loader, nothing else.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from ..core.reference import ReferenceModel
from ..core.schedulers import StepRule, build_step_rule

LORA_TARGETS = {
    # NeMo-Aligner's "sdlora": the attention projections of every transformer block.
    "sdlora": ["to_q", "to_k", "to_v", "to_out.0"],
    # attention plus the feed-forward linears of every transformer block.
    "lora": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
}


@dataclass
class Conditioning:
    """UNet keyword arguments for the prompts (``cond``) and for the empty prompt (``uncond``),
    each a dict such as ``{"encoder_hidden_states": [B, L, D]}`` (plus ``added_cond_kwargs`` for SDXL)."""

    cond: Dict
    uncond: Dict

    @property
    def batch_size(self) -> int:
        return int(self.cond["encoder_hidden_states"].shape[0])


def _cat(a, b):
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    return torch.cat([a, b], dim=0)


def _expand(tree, batch: int):
    if isinstance(tree, dict):
        return {k: _expand(v, batch) for k, v in tree.items()}
    return tree.expand(batch, *tree.shape[1:])


# diffusers VAE classes a pipeline's ``vae/`` may hold: SD's KL autoencoder, or the norm-free
# ``AutoencoderTiny`` (TAESD architecture; the embedded shapes model ships one). Both decode with
# ``vae.decode(z / scaling_factor).sample`` into [−1, 1] and downsample by 8.
VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")


def load_vae(path: str, subfolder: Optional[str] = "vae", **kwargs):
    """The VAE of a local diffusers pipeline directory, of the class its ``config.json`` names."""
    import json

    import diffusers

    config = os.path.join(path, subfolder or "", "config.json")
    try:
        with open(config) as f:
            name = json.load(f).get("_class_name", "AutoencoderKL")
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"VAE config {config!r} is missing or not JSON ({e})") from None
    if name not in VAE_CLASSES:
        raise ValueError(f"{config}: _class_name {name!r} is not a supported VAE (expected one of {list(VAE_CLASSES)})")
    return getattr(diffusers, name).from_pretrained(path, subfolder=subfolder, local_files_only=True, **kwargs)


class DiffusionBackend:
    """Stable Diffusion 1.x / 2.x (ε- or v-prediction) on diffusers modules."""

    family = "sd"
    default_sampler = "ddim"

    def __init__(self, unet, vae, text_encoders: Sequence, tokenizers: Sequence, scheduler,
                 frozen_dtype: torch.dtype = torch.float32):
        self.unet = unet
        self.vae = vae
        self.text_encoders = list(text_encoders)
        self.tokenizers = list(tokenizers)
        self.scheduler = scheduler
        self.frozen_dtype = frozen_dtype
        self._uncond_cache: Optional[Dict] = None
        self.reference_model: Optional[ReferenceModel] = None
        for m in [unet, vae, *self.text_encoders]:
            m.requires_grad_(False)
            m.eval()
        # The VAE encoder is never used by reward fine-tuning: do not keep it in memory.
        if getattr(self.vae, "encoder", None) is not None:
            self.vae.encoder = None
        for m in self.text_encoders:
            m.to(dtype=frozen_dtype)
        self.vae.to(dtype=self._vae_dtype(frozen_dtype))

    def _vae_dtype(self, frozen_dtype: torch.dtype) -> torch.dtype:
        """dtype the VAE is stored and run in (SDXL keeps it in fp32 where its config asks)."""
        return frozen_dtype

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str, frozen_dtype: torch.dtype = torch.float32) -> "DiffusionBackend":
        """Load the pieces of a diffusers pipeline directory (``model_index.json``) from local disk."""
        from diffusers import UNet2DConditionModel
        from diffusers.schedulers import DDIMScheduler
        from transformers import CLIPTextModel, CLIPTokenizer

        _check_pipeline_dir(path)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
        vae = load_vae(path)
        te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
        tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        sched = DDIMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
        return cls(unet, vae, [te], [tok], sched, frozen_dtype)

    # ----------------------------------------------------------------- prompts
    def _tokenize(self, tokenizer, prompts: List[str]) -> torch.Tensor:
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        return ids.to(self.device)

    def _encode(self, prompts: List[str]) -> Dict:
        """Prompts → UNet kwargs. SD: the last hidden state of the CLIP text encoder ``[B, 77, D]``."""
        te = self.text_encoders[0]
        hidden = te(self._tokenize(self.tokenizers[0], prompts))[0]
        return {"encoder_hidden_states": hidden}

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        prompts = list(prompts)
        cond = self._encode(prompts)
        if self._uncond_cache is None:
            self._uncond_cache = self._encode_uncond()
        return Conditioning(cond=cond, uncond=_expand(self._uncond_cache, len(prompts)))

    def _encode_uncond(self) -> Dict:
        """UNet kwargs of the unconditional branch for one sample: the empty prompt's encoding."""
        return self._encode([""])

    # ----------------------------------------------------------------- UNet
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def denoiser(self, cond: Conditioning, guidance_scale: float, unet=None):
        """A :data:`~..core.sampler.Denoiser` with classifier-free guidance:
        out = out_u + w·(out_c − out_u), one batched UNet call for both halves."""
        net = unet if unet is not None else self.unet
        w = float(guidance_scale)
        if w == 1.0:
            kwargs = cond.cond
        else:
            kwargs = _cat(cond.uncond, cond.cond)

        def fn(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if w == 1.0:
                return net(x_in, t, **kwargs).sample
            t2 = torch.cat([t, t]) if torch.is_tensor(t) and t.ndim else t  # per-sample steps (DDPO)
            out = net(torch.cat([x_in, x_in]), t2, **kwargs).sample
            out_u, out_c = out.chunk(2)
            return out_u + w * (out_c - out_u)

        return fn

    def reference_denoiser(self, cond: Conditioning, guidance_scale: float):
        """The frozen reference's denoiser (adapters off, or the frozen copy). Always under no_grad."""
        if self.reference_model is None:
            raise RuntimeError("no reference model: call backend.setup_reference() first")
        ref = self.reference_model

        def fn(x_in, t):
            with ref.view() as net:
                return self.denoiser(cond, guidance_scale, unet=net)(x_in, t)

        return fn

    def setup_reference(self, use_adapters: bool) -> ReferenceModel:
        self.reference_model = ReferenceModel(self.unet, use_adapters=use_adapters)
        return self.reference_model

    def set_activation_checkpointing(self, on: bool) -> None:
        """Recompute the UNet blocks' activations in backward instead of storing them (diffusers'
        gradient checkpointing); only active while autograd records, so no_grad steps cost nothing."""
        if on:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    def step_rule(self, num_steps: int, sampler: Optional[str] = None) -> StepRule:
        return build_step_rule(self.scheduler, num_steps, sampler or self.default_sampler)

    def initial_latents(self, batch: int, height: int, width: int, rule: StepRule,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
        shape = (batch, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        x = torch.randn(shape, generator=generator, dtype=torch.float32)
        return x.to(self.device) * rule.init_noise_sigma()

    # ----------------------------------------------------------------- VAE
    def decode(self, latents: torch.Tensor, batch_size: Optional[int] = None) -> torch.Tensor:
        """Latents ``[B, C, h, w]`` → images ``[B, 3, H, W]`` in [0, 1], differentiable."""
        cfg = self.vae.config
        z = latents / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None):
            z = z + cfg.shift_factor
        z = z.to(self.vae.dtype)  # frozen_dtype, or fp32 where a backend keeps the VAE upcast
        chunks = z.split(batch_size or z.shape[0])
        images = torch.cat([self.vae.decode(c).sample for c in chunks])
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ----------------------------------------------------------------- LoRA
    def add_lora(self, rank: int, alpha: float, target_modules: Sequence[str]) -> List[torch.nn.Parameter]:
        """Insert peft LoRA adapters (B initialised to zero: the policy starts equal to the reference)."""
        from peft import LoraConfig

        if rank <= 0:
            raise ValueError(f"LoRA rank must be > 0, got {rank}")
        config = LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=list(target_modules),
                            init_lora_weights=True)
        self.unet.add_adapter(config)
        params = [p for n, p in self.unet.named_parameters() if "lora_" in n]
        if not params:
            raise ValueError(f"no UNet module matched LoRA target_modules {list(target_modules)}")
        for p in params:
            p.requires_grad_(True)
            p.data = p.data.float()
        return params

    def trainable_parameters(self) -> List[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def set_full_finetune(self) -> List[torch.nn.Parameter]:
        self.unet.requires_grad_(True)
        return list(self.unet.parameters())

    def to(self, device):
        for m in [self.unet, self.vae, *self.text_encoders]:
            m.to(device)
        if self.reference_model is not None and self.reference_model.frozen is not None:
            self.reference_model.frozen.to(device)
        return self


def _check_pipeline_dir(path: str) -> None:
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a directory (expected a local diffusers pipeline directory "
                                f"with model_index.json)")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"{path!r} has no model_index.json (expected a diffusers pipeline directory "
                                f"saved with save_pretrained)")


def detect_family(path: str) -> str:
    import json

    _check_pipeline_dir(path)
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    return "sdxl" if "text_encoder_2" in index else "sd"


def load_backend(path: str, family: str = "auto", frozen_dtype: torch.dtype = torch.float32) -> DiffusionBackend:
    """``family``: ``sd``, ``sdxl`` or ``auto`` (read from model_index.json)."""
    fam = detect_family(path) if family == "auto" else family
    if fam == "sd":
        return DiffusionBackend.from_pretrained(path, frozen_dtype)
    if fam == "sdxl":
        from .sdxl import SDXLBackend

        return SDXLBackend.from_pretrained(path, frozen_dtype)
    raise ValueError(f"unknown model family {family!r} (expected 'auto', 'sd' or 'sdxl')")
