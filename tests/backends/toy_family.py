"""A toy model family added in one file: a denoiser that is not a UNet, conditioned on the pooled text
embedding through FiLM layers and called with its own keyword arguments.

It shows — and ``test_toy_family.py`` tests — that a family is one backend file plus one registry line:
the registry recognises its pipeline directory from ``model_index.json``'s ``_class_name``, and the
sampler, CFG, LoRA (on its ``film`` layers), the reference, validation and checkpoints all come from the
shared shell. Not a family this package ships.
"""
import json
import os

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin

from nemo_aligner_draft.backends.base import DiffusionBackend, check_pipeline_dir, load_vae

PIPELINE_CLASS = "ToyFiLMPipeline"


class ToyDenoiser(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """ε(x, t, text) = conv_out(silu(film(t, text) ⊙ conv_in(x))): a 2-layer conv net with FiLM."""

    @register_to_config
    def __init__(self, in_channels: int = 4, hidden: int = 16, text_dim: int = 32):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.film_scale = torch.nn.Linear(text_dim + 1, hidden)
        self.film_shift = torch.nn.Linear(text_dim + 1, hidden)
        self.conv_out = torch.nn.Conv2d(hidden, in_channels, 3, padding=1)

    def forward(self, latents, timestep, text_embeds):
        t = torch.as_tensor(timestep, dtype=latents.dtype, device=latents.device).reshape(-1)
        t = t.expand(latents.shape[0]) if t.numel() == 1 else t
        cond = torch.cat([text_embeds.to(latents.dtype), (t / 1000.0)[:, None]], dim=1)
        h = self.conv_in(latents)
        h = h * (1 + self.film_scale(cond)[:, :, None, None]) + self.film_shift(cond)[:, :, None, None]
        return self.conv_out(torch.nn.functional.silu(h))


class ToyBackend(DiffusionBackend):
    family = "toy_film"

    @classmethod
    def from_pretrained(cls, path, frozen_dtype=torch.float32):
        from diffusers import DDIMScheduler
        from transformers import CLIPTextModel, CLIPTokenizer

        check_pipeline_dir(path)
        net = ToyDenoiser.from_pretrained(path, subfolder="denoiser", local_files_only=True)
        te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
        tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        sched = DDIMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
        return cls(net, load_vae(path), [te], [tok], sched, frozen_dtype)

    def _encode(self, prompts):
        out = self.text_encoders[0](self._tokenize(self.tokenizers[0], prompts))
        return {"text_embeds": out.pooler_output}

    def _net_call(self, net, x, t, conditioning):
        return net(latents=x, timestep=t, **conditioning)

    def set_activation_checkpointing(self, on: bool) -> None:
        pass  # two layers: nothing worth recomputing


def save_toy_pipeline(path: str, seed: int = 0) -> str:
    """A toy pipeline directory: the tiny SD's VAE, text encoder, tokenizer and scheduler, the toy
    denoiser, and a model_index.json naming the toy pipeline class."""
    from nemo_aligner_draft.testing.tiny import build_tiny_sd_pipeline

    sd = build_tiny_sd_pipeline(seed)
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        getattr(sd, name).save_pretrained(os.path.join(path, name))
    torch.manual_seed(seed)
    ToyDenoiser(text_dim=sd.text_encoder.config.hidden_size).save_pretrained(os.path.join(path, "denoiser"))
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump({"_class_name": PIPELINE_CLASS, "denoiser": ["toy_family", "ToyDenoiser"],
                   "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"]}, f)
    return path
