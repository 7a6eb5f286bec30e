"""Conversion of trained weights for inference (diffusers LoRA, merged pipelines, .nemo) and import
of NeMo Stable Diffusion / NeMo-Aligner checkpoints. See the README section "Use the result"."""
from .ldm_layout import ConversionError  # noqa: F401
from .lora import export_lora  # noqa: F401
