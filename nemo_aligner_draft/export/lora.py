"""LoRA export in the diffusers format (``pytorch_lora_weights.safetensors``).

The adapter's rank and alpha travel as peft adapter metadata inside the safetensors header, so
``pipeline.load_lora_weights(dir)`` restores the exact scale alpha/rank even when alpha ≠ rank.
The file is written to a temporary directory and renamed into place.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import torch

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def export_lora(unet: torch.nn.Module, out_dir: str, family: str = "sd") -> str:
    """Write the UNet's active LoRA adapter to ``out_dir/pytorch_lora_weights.safetensors``."""
    from peft.utils import get_peft_model_state_dict

    if not getattr(unet, "peft_config", None):
        raise ValueError("the UNet has no LoRA adapter to export (model.peft.peft_scheme is 'none'?)")
    adapter = next(iter(unet.peft_config))
    config = unet.peft_config[adapter]
    state = {k: v.detach().to("cpu", torch.float32).contiguous()
             for k, v in get_peft_model_state_dict(unet, adapter_name=adapter).items()}
    if family == "sdxl":
        from diffusers import StableDiffusionXLPipeline as Pipe
    else:
        from diffusers import StableDiffusionPipeline as Pipe
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".lora-export-", dir=parent)
    try:
        Pipe.save_lora_weights(tmp, unet_lora_layers=state, weight_name=WEIGHT_NAME, safe_serialization=True,
                               unet_lora_adapter_metadata=config.to_dict())
        os.makedirs(out_dir, exist_ok=True)
        os.replace(os.path.join(tmp, WEIGHT_NAME), os.path.join(out_dir, WEIGHT_NAME))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(out_dir, WEIGHT_NAME)
