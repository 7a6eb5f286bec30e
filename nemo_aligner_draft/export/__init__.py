"""Conversion of trained weights for inference (diffusers LoRA, merged pipelines, .nemo)."""
from .lora import export_lora  # noqa: F401
