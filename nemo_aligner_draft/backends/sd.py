"""Stable Diffusion 1.x / 2.x (ε- or v-prediction) behind :class:`~.base.DiffusionBackend`.

The UNet is conditioned on the last hidden state of one CLIP text encoder, ``[B, 77, D]``; the
unconditional branch is the empty prompt's encoding. Sampling defaults to DDIM.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from .base import DiffusionBackend, check_pipeline_dir, load_vae


class SDBackend(DiffusionBackend):
    family = "sd"

    @property
    def unet(self):
        """The family's name for :attr:`net`."""
        return self.net

    @classmethod
    def from_pretrained(cls, path: str, frozen_dtype: torch.dtype = torch.float32) -> "SDBackend":
        """Load the pieces of a diffusers pipeline directory (``model_index.json``) from local disk."""
        from diffusers import UNet2DConditionModel
        from diffusers.schedulers import DDIMScheduler
        from transformers import CLIPTextModel, CLIPTokenizer

        check_pipeline_dir(path)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
        vae = load_vae(path)
        te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
        tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        sched = DDIMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
        return cls(unet, vae, [te], [tok], sched, frozen_dtype)

    def _encode(self, prompts: List[str]) -> Dict:
        te = self.text_encoders[0]
        hidden = te(self._tokenize(self.tokenizers[0], prompts))[0]
        return {"encoder_hidden_states": hidden}
