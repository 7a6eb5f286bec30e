"""NeMo → diffusers: a NeMo Stable Diffusion checkpoint to a diffusers pipeline directory
(``nad-convert from-nemo``), and NeMo-Aligner DRaFT+ LoRA adapters (``ParallelLinearAdapter``
``linear_in`` [r, in] / ``linear_out`` [out, r], output scaled by alpha/r) to a diffusers LoRA file
(``nad-convert from-nemo-lora``).

The architecture, text encoder, tokenizer and scheduler come from ``base``, a diffusers pipeline of the
same model; every key and shape is checked against it before anything is written.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Optional

import torch

from ..backends import detect_family, get_family
from ..backends.base import lora_config
from .ldm_layout import (
    UNET_PREFIXES,
    VAE_PREFIXES,
    ConversionError,
    strip_prefix,
    unet_from_nemo,
    unet_key_map,
    vae_from_nemo,
)
from .lora import WEIGHT_NAME, save_lora_file
from .output import atomic_output, write_pipeline
from .read import check_pipeline, load_denoiser, read_nemo_archive


def import_nemo(path: str, base: str, out_dir: str, layout: Optional[str] = None) -> str:
    """NeMo Stable Diffusion ``.nemo``/``.ckpt`` → diffusers pipeline directory.

    UNet (and the VAE when the checkpoint holds one) come from ``path``; everything else and the
    architecture come from ``base``. Every UNet/VAE key and shape is checked before anything is written.
    """
    from diffusers import AutoencoderKL

    from ..backends.base import load_vae

    base = check_pipeline(base, "--base")
    _, weights = read_nemo_archive(path)
    family = get_family(detect_family(base))
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


_ADAPTER = re.compile(r"^(?P<module>.+?)\.adapter_layer\.[^.]+\.linear_(?P<which>in|out)\.weight$")


def nemo_lora_to_diffusers(weights: Dict[str, torch.Tensor], unet_config, unet_keys, alpha: Optional[float]):
    """NeMo-Aligner ``ParallelLinearAdapter`` weights → (peft LoRA state dict, LoraConfig).

    NeMo computes y = W x + (alpha/r)·linear_out(linear_in(x)); with lora_A = linear_in ``[r, in]``,
    lora_B = linear_out ``[out, r]`` and peft's scale lora_alpha/r the update ΔW = (alpha/r)·B A is
    the same. ``alpha`` None means NeMo's default alpha = r.
    """
    found: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        m = _ADAPTER.match(key)
        if m is not None:  # other keys (base weights, where saved) are not adapters
            found.setdefault(m["module"], {})[m["which"]] = value
    if not found:
        raise ConversionError(f"no NeMo adapter weights ('<module>.adapter_layer.<name>.linear_in.weight') among "
                              f"{len(weights)} keys, e.g. {sorted(weights)[:10]}")
    inv = {v: k for k, v in unet_key_map(unet_keys, unet_config, "ldm").items()}
    state, bad, ranks = {}, [], set()
    for module, pair in found.items():
        stripped = next((module[len(p):] for p in UNET_PREFIXES if p and module.startswith(p)), module)
        # NeMo attaches the output projection's adapter to the to_out Sequential, diffusers to to_out.0
        target = inv.get(stripped + ".weight") or inv.get(stripped + ".0.weight")
        if target is None or set(pair) != {"in", "out"}:
            bad.append(module)
            continue
        a, b = pair["in"], pair["out"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            bad.append(f"{module}: linear_in {tuple(a.shape)}, linear_out {tuple(b.shape)}")
            continue
        name = target[: -len(".weight")]
        state[f"{name}.lora_A.weight"] = a.float().contiguous()
        state[f"{name}.lora_B.weight"] = b.float().contiguous()
        ranks.add(int(a.shape[0]))
    if bad:
        raise ConversionError(f"{len(bad)} NeMo adapters do not map onto the base UNet (unknown module, missing "
                              f"linear_in/linear_out or inconsistent rank), e.g. {bad[:10]}")
    if len(ranks) != 1:
        raise ConversionError(f"NeMo adapters have different ranks {sorted(ranks)}; expected one adapter_dim")
    r = ranks.pop()
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    return state, lora_config(r, alpha if alpha is not None else r, targets)


def import_nemo_lora(path: str, base: str, out_dir: str, alpha: Optional[float] = None) -> str:
    """NeMo-Aligner DRaFT+ LoRA (``.nemo`` or ``.ckpt``) → ``out_dir/pytorch_lora_weights.safetensors``.
    ``alpha``: the run's ``model.peft.lora_tuning.network_alpha`` (read from the .nemo config if omitted)."""
    base = check_pipeline(base, "--base")
    config, weights = read_nemo_archive(path)
    if alpha is None:
        alpha = ((config.get("peft") or {}).get("lora_tuning") or {}).get("network_alpha")
    family = detect_family(base)
    unet = load_denoiser(base, family)
    own = unet.state_dict()
    state, lcfg = nemo_lora_to_diffusers(weights, unet.config, own.keys(), alpha)
    shapes = [f"{k}: {tuple(v.shape)}" for k, v in state.items()
              if (k.endswith("lora_A.weight") and v.shape[1] != own[k.rsplit(".lora_", 1)[0] + ".weight"].shape[1])
              or (k.endswith("lora_B.weight") and v.shape[0] != own[k.rsplit(".lora_", 1)[0] + ".weight"].shape[0])]
    if shapes:
        raise ConversionError(f"{len(shapes)} adapter factors do not fit the base UNet's layers, e.g. {shapes[:10]}")
    with atomic_output(out_dir, is_dir=True) as tmp:
        save_lora_file(tmp, state, lcfg.to_dict(), family)
    return os.path.join(out_dir, WEIGHT_NAME)
