"""LoRA files in the diffusers format (``pytorch_lora_weights.safetensors``): the writer shared by
training's own export, ``nad-convert to-lora`` and the NeMo-Aligner adapter import.

The adapter's rank and alpha travel as peft adapter metadata inside the safetensors header, so
``pipeline.load_lora_weights(dir)`` restores the exact scale alpha/rank even when alpha ≠ rank.
:func:`export_lora` writes to a temporary directory and renames the file into place.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Dict

import torch

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def save_lora_file(directory: str, state: Dict[str, torch.Tensor], adapter_config: dict, family: str) -> str:
    """Write peft-named UNet factors ``state`` and their adapter config to ``directory/WEIGHT_NAME``."""
    import diffusers

    from ..backends import get_family

    # the family's pipeline class: its save_lora_weights writes the key prefixes its load_lora_weights expects,
    # and names its arguments after the denoiser's component (unet_lora_layers, transformer_lora_layers, ...)
    fam = get_family(family)
    pipe = getattr(diffusers, fam.pipeline_class)
    part = fam.denoiser_subfolder
    pipe.save_lora_weights(directory, weight_name=WEIGHT_NAME, safe_serialization=True,
                           **{f"{part}_lora_layers": state, f"{part}_lora_adapter_metadata": adapter_config})
    return os.path.join(directory, WEIGHT_NAME)


def export_lora(unet: torch.nn.Module, out_dir: str, family: str = "sd", state_dict=None) -> str:
    """Write the UNet's active LoRA adapter to ``out_dir/pytorch_lora_weights.safetensors``.
    ``state_dict``: the UNet's weights when its own ``state_dict()`` would not hold them whole (FSDP)."""
    from peft.utils import get_peft_model_state_dict

    if not getattr(unet, "peft_config", None):
        raise ValueError("the UNet has no LoRA adapter to export (model.peft.peft_scheme is 'none'?)")
    adapter = next(iter(unet.peft_config))
    config = unet.peft_config[adapter]
    state = {k: v.detach().to("cpu", torch.float32).contiguous()
             for k, v in get_peft_model_state_dict(unet, state_dict=state_dict, adapter_name=adapter).items()}
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    # a resumed run exports into the same out_dir again: replace the old file whole, never half-write it
    tmp = tempfile.mkdtemp(prefix=".lora-export-", dir=parent)
    try:
        save_lora_file(tmp, state, config.to_dict(), family)
        os.makedirs(out_dir, exist_ok=True)
        os.replace(os.path.join(tmp, WEIGHT_NAME), os.path.join(out_dir, WEIGHT_NAME))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(out_dir, WEIGHT_NAME)
