"""Conversion of trained weights for inference (diffusers LoRA, merged pipelines, .nemo) and import
of NeMo Stable Diffusion / NeMo-Aligner checkpoints. See docs/use_the_result.md."""
from .ldm_layout import ConversionError  # noqa: F401
from .lora import export_lora  # noqa: F401
