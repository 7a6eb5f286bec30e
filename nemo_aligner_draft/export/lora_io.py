"""Reading diffusers LoRA files back into a denoising network (inference side of :mod:`.lora`).

A file written by :func:`.lora.export_lora` or by the converters holds peft-named factors under
``unet.<module>.lora_{A,B}.weight`` (SD, SDXL) or ``transformer.<module>...`` (SD3, FLUX) and the adapter
config (rank, alpha) as JSON in the safetensors header. The applied update is ΔW = scale·(lora_alpha/r)·B A.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Tuple

import torch

from .ldm_layout import ConversionError
from .lora import WEIGHT_NAME

META_KEY = "lora_adapter_metadata"


DENOISER_PREFIXES = ("unet", "transformer")  # diffusers' LoRA key prefix of each kind of denoising network


def read_lora(path: str, expected: str = None) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(LoRA state dict with peft keys ``<module>.lora_A.weight``, adapter config dict).

    ``path``: the safetensors file or the directory holding ``pytorch_lora_weights.safetensors``, as
    diffusers' ``save_lora_weights`` writes it: every key under one prefix, ``unet.`` (SD, SDXL) or
    ``transformer.`` (SD3, FLUX). ``expected``: the prefix the model to load it into needs (its family's
    denoiser subfolder); a file for the other kind of network is refused. The config's ``prefix`` says
    which it was. Without header metadata, alpha = r (diffusers' default for a file without alphas).
    """
    from safetensors import safe_open

    if os.path.isdir(path):
        path = os.path.join(path, WEIGHT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file {path!r} does not exist")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    prefixes = {k.split(".", 1)[0] for k in state}
    prefix = prefixes.pop() if len(prefixes) == 1 else None
    bad = [k for k in state if prefix not in DENOISER_PREFIXES or ".lora_" not in k]
    if bad or not state:
        raise ConversionError(f"{path!r}: {len(bad)} keys are not diffusers LoRA factors of one network "
                              f"('unet.<module>.lora_A.weight' or 'transformer.<module>.lora_A.weight'), "
                              f"e.g. {sorted(bad)[:10]}")
    if expected is not None and prefix != expected:
        raise ConversionError(f"{path!r} is a LoRA of a {prefix} ('{prefix}.' keys), but this model's denoising "
                              f"network is its {expected}: it was trained on another model family")
    n = len(prefix) + 1
    state = {k[n:]: v for k, v in state.items()}
    ranks = {int(v.shape[0]) for k, v in state.items() if ".lora_A." in k}
    if META_KEY in meta:
        raw = json.loads(meta[META_KEY])
        config = {k[n:]: v for k, v in raw.items() if k.startswith(prefix + ".")}
    else:
        if len(ranks) != 1:
            raise ConversionError(f"{path!r}: no adapter metadata and mixed ranks {sorted(ranks)}")
        r = ranks.pop()
        config = {"r": r, "lora_alpha": float(r)}
    config["target_modules"] = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    config["prefix"] = prefix
    return state, config


def lora_scale(config: dict) -> float:
    """peft's s = lora_alpha / r (no per-module patterns)."""
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ConversionError("LoRA files with per-module rank/alpha patterns are not supported here")
    return float(config["lora_alpha"]) / float(config["r"])


def apply_lora(unet, state: Dict[str, torch.Tensor], r: int, lora_alpha: float, adapter_name: str = "default"):
    """Add a peft adapter with (r, lora_alpha) to ``unet`` and load ``state`` into it; checks every key."""
    from peft.utils import set_peft_model_state_dict

    from ..backends.base import lora_config

    targets = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    modules = dict(unet.named_modules())
    unknown = [t for t in targets if t not in modules]
    if unknown:
        raise ConversionError(f"{len(unknown)} LoRA modules do not exist in this UNet (wrong base model?), "
                              f"e.g. {unknown[:10]}")
    unet.add_adapter(lora_config(r, lora_alpha, targets), adapter_name)
    result = set_peft_model_state_dict(unet, state, adapter_name=adapter_name)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k and adapter_name in k]
    if missing or getattr(result, "unexpected_keys", None):
        raise ConversionError(f"LoRA does not fit the UNet: missing {missing[:10]}, "
                              f"unexpected {list(result.unexpected_keys)[:10]}")
    unet.set_adapter(adapter_name)
    return unet
