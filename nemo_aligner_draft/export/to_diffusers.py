"""Training output → diffusers: a full pipeline directory with the LoRA merged into the denoiser
(``nad-convert to-diffusers``), or the LoRA alone as ``pytorch_lora_weights.safetensors``
(``nad-convert to-lora``). The frozen components are copied from the base pipeline."""
from __future__ import annotations

import os
from typing import Optional

from ..backends import detect_family, get_family
from ..core.soup import lora_delta
from .lora import WEIGHT_NAME, export_lora
from .output import atomic_output, write_pipeline
from .read import load_trained_unet


def merged_unet(unet, scale: float = 1.0):
    """A plain copy of ``unet`` (no peft layers) with W + scale·(alpha/r)·B A folded into every LoRA layer."""
    from peft.tuners.lora import LoraLayer

    plain = type(unet).from_config(unet.config)
    state = {key.replace(".base_layer.", "."): value.clone()
             for key, value in unet.state_dict().items() if "lora_" not in key}
    for name, m in unet.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        for adapter in m.active_adapters:
            if adapter not in m.lora_A:
                continue
            w = state[f"{name}.weight"]
            delta = lora_delta(m.lora_A[adapter].weight, m.lora_B[adapter].weight, m.scaling[adapter] * scale)
            state[f"{name}.weight"] = (w.double() + delta).to(w.dtype)
    plain.load_state_dict(state, strict=True)
    return plain


def load_merged_unet(path: str, base: Optional[str] = None, lora_scale: float = 1.0):
    """(UNet with the run's LoRA merged, base dir) of a training output; a full fine-tune's UNet as it is."""
    unet, _, base = load_trained_unet(path, base)
    if getattr(unet, "peft_config", None):
        unet = merged_unet(unet, lora_scale)
    return unet, base


def export_diffusers(path: str, out_dir: str, base: Optional[str] = None, lora_scale: float = 1.0) -> str:
    """Training output → full diffusers pipeline directory with the LoRA merged into the UNet.
    The frozen components (text encoders, VAE, tokenizers, scheduler) are copied from ``base``."""
    unet, base = load_merged_unet(path, base, lora_scale)
    return write_pipeline(base, out_dir, {get_family(detect_family(base)).denoiser_subfolder: unet})


def export_lora_file(path: str, out_dir: str, base: Optional[str] = None) -> str:
    """Training output → ``out_dir/pytorch_lora_weights.safetensors`` (diffusers ``load_lora_weights``)."""
    unet, _, base = load_trained_unet(path, base)
    with atomic_output(out_dir, is_dir=True) as tmp:
        export_lora(unet, tmp, family=detect_family(base))
    return os.path.join(out_dir, WEIGHT_NAME)
