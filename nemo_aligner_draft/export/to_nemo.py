"""Training output or diffusers pipeline → NeMo Stable Diffusion ``.nemo`` (``nad-convert to-nemo``):
the merged UNet and the VAE re-laid out by :mod:`.ldm_layout`, with the diffusers configs kept in
``model_config.yaml`` so the import can check the architecture."""
from __future__ import annotations

import json
import os
import tarfile
import tempfile
from typing import Optional

import torch

from .ldm_layout import UNET_PREFIXES, VAE_PREFIXES, unet_to_nemo, vae_to_nemo
from .output import atomic_output
from .read import load_denoiser
from .to_diffusers import load_merged_unet

# the prefixes MegatronLatentDiffusion gives its modules, the first of those the import accepts
NEMO_UNET_PREFIX = UNET_PREFIXES[0]
NEMO_VAE_PREFIX = VAE_PREFIXES[0]


def _unet_and_vae(source: str, base: Optional[str]):
    """(merged UNet, VAE, base dir) of a training output or a diffusers pipeline directory."""
    from diffusers import AutoencoderKL

    from ..backends.base import load_vae

    if os.path.isfile(os.path.join(source, "model_index.json")):
        unet, base = load_denoiser(source), source
    else:
        unet, base = load_merged_unet(source, base)
    vae = load_vae(base)
    if not isinstance(vae, AutoencoderKL):
        raise ValueError(f"{os.path.join(base, 'vae')}: the NeMo/LDM checkpoint layout holds an AutoencoderKL VAE, "
                         f"this pipeline's VAE is {type(vae).__name__}; export its UNet as a diffusers pipeline "
                         f"or LoRA instead")
    return unet, vae, base


def _plain_config(config) -> dict:
    # diffusers configs hold tuples (and FrozenDicts); the YAML must hold plain lists and dicts
    return json.loads(json.dumps(dict(config), default=list))


def export_nemo(source: str, out_file: str, base: Optional[str] = None, layout: str = "ldm") -> str:
    """Training output or diffusers pipeline → NeMo Stable Diffusion ``.nemo`` (tar of
    ``model_config.yaml`` + ``model_weights.ckpt``; UNet under ``model.model.diffusion_model.``, VAE
    under ``model.first_stage_model.``, in NeMo's ``layout``)."""
    import yaml

    unet, vae, base = _unet_and_vae(source, base)
    weights = {NEMO_UNET_PREFIX + k: v.contiguous() for k, v in unet_to_nemo(unet.state_dict(), unet.config, layout).items()}
    weights.update({NEMO_VAE_PREFIX + k: v.contiguous() for k, v in vae_to_nemo(vae.state_dict(), vae.config, layout).items()})
    config = {"unet_config": {"from_NeMo": layout == "ldm", "layout": layout,
                              "diffusers_config": _plain_config(unet.config)},
              "first_stage_config": {"diffusers_config": _plain_config(vae.config)},
              "scale_factor": float(vae.config.scaling_factor), "converted_by": "nemo_aligner_draft"}
    with atomic_output(out_file, is_dir=False) as tmp, tempfile.TemporaryDirectory() as work:
        with open(os.path.join(work, "model_config.yaml"), "w") as f:
            yaml.safe_dump(config, f)
        torch.save(weights, os.path.join(work, "model_weights.ckpt"))
        with tarfile.open(tmp, "w") as tar:
            for name in ("model_config.yaml", "model_weights.ckpt"):
                tar.add(os.path.join(work, name), arcname=f"./{name}")
    return out_file
