"""NeMo → diffusers: a NeMo Stable Diffusion checkpoint to a diffusers pipeline directory
(``nad-convert from-nemo``), and NeMo-Aligner DRaFT+ LoRA adapters (``ParallelLinearAdapter``
``linear_in`` [r, in] / ``linear_out`` [out, r], output scaled by network_alpha/r, or 1 when null;
key layout in :mod:`.nemo_adapters`) to a diffusers LoRA file (``nad-convert from-nemo-lora``).

The architecture, text encoder, tokenizer and scheduler come from ``base``, a diffusers pipeline of the
same model; every key and shape is checked against it before anything is written.
"""
from __future__ import annotations

import os
from typing import Optional

from ..backends import get_family
from ..backends.base import lora_config
from .ldm_layout import (
    UNET_PREFIXES,
    VAE_PREFIXES,
    ConversionError,
    strip_prefix,
    unet_from_nemo,
    vae_from_nemo,
)
from .lora import WEIGHT_NAME, save_lora_file
from .nemo_adapters import network_alpha_of, nemo_to_peft
from .output import atomic_output, write_pipeline
from .read import check_nemo_family, check_pipeline, load_denoiser, read_nemo_archive


def import_nemo(path: str, base: str, out_dir: str, layout: Optional[str] = None) -> str:
    """NeMo Stable Diffusion ``.nemo``/``.ckpt`` → diffusers pipeline directory.

    UNet (and the VAE when the checkpoint holds one) come from ``path``; everything else and the
    architecture come from ``base``. Every UNet/VAE key and shape is checked before anything is written.
    """
    from diffusers import AutoencoderKL

    from ..backends.base import load_vae

    base = check_pipeline(base, "--base")
    family = get_family(check_nemo_family(base))
    _, weights = read_nemo_archive(path)
    unet = load_denoiser(base, family.name)
    nemo_unet = strip_prefix(weights, UNET_PREFIXES, "input_blocks.0.0.weight")
    unet.load_state_dict(unet_from_nemo(nemo_unet, unet.state_dict(), unet.config, layout), strict=True)
    replaced = {family.denoiser_subfolder: unet}
    # a checkpoint without VAE weights keeps the base pipeline's VAE
    if any(p + "decoder.conv_in.weight" in weights for p in VAE_PREFIXES if p):
        vae = load_vae(base)
        if not isinstance(vae, AutoencoderKL):
            raise ValueError(f"{path} holds an LDM (AutoencoderKL) VAE but --base {base} has a {type(vae).__name__} VAE")
        nemo_vae = strip_prefix(weights, [p for p in VAE_PREFIXES if p], "decoder.conv_in.weight")
        vae.load_state_dict(vae_from_nemo(nemo_vae, vae.state_dict(), vae.config), strict=True)
        replaced["vae"] = vae
    return write_pipeline(base, out_dir, replaced)


_UNSET = object()


def resolve_network_alpha(config: dict, alpha=_UNSET) -> Optional[float]:
    """NeMo's network_alpha of a run: ``alpha`` when given (None meaning null), else the checkpoint
    config's ``peft.lora_tuning.network_alpha``, else null (NeMo-Aligner's draftp_sd.yaml default)."""
    if alpha is not _UNSET:
        return None if alpha in (None, 0) else float(alpha)
    _, value = network_alpha_of(config)
    return value


def import_nemo_lora(path: str, base: str, out_dir: str, alpha=_UNSET) -> str:
    """NeMo-Aligner DRaFT+ LoRA (``.nemo``, Lightning ``.ckpt`` or bare state dict) →
    ``out_dir/pytorch_lora_weights.safetensors``.

    The policy adapters (``model.model.diffusion_model.*``: attention and feed-forward LinearWrappers)
    become peft factors lora_A = linear_in, lora_B = linear_out, bit for bit; the reference's
    ``init_model.*`` adapters are checked and dropped (see :mod:`.nemo_adapters`). ``alpha``: the run's
    network_alpha, None for null; by default read from the checkpoint's config (the ``.nemo``
    model_config.yaml or the ``.ckpt`` hyper_parameters), else null (scale 1)."""
    base = check_pipeline(base, "--base")
    family = check_nemo_family(base)
    config, weights = read_nemo_archive(path)
    network_alpha = resolve_network_alpha(config, alpha)
    unet = load_denoiser(base, family)
    state, rank, _ = nemo_to_peft(weights, unet)
    lt = ((config.get("peft") or {}).get("lora_tuning") or {}) if isinstance(config, dict) else {}
    if lt.get("adapter_dim") not in (None, rank):
        raise ConversionError(f"{path!r}: the config says adapter_dim={lt['adapter_dim']}, "
                              f"the adapters have rank {rank}")
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    lcfg = lora_config(rank, network_alpha, targets)
    with atomic_output(out_dir, is_dir=True) as tmp:
        save_lora_file(tmp, state, lcfg.to_dict(), family)
    return os.path.join(out_dir, WEIGHT_NAME)
