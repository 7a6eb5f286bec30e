"""Conversion of trained weights for inference (diffusers LoRA, merged pipelines, .nemo) and import
of NeMo Stable Diffusion / NeMo-Aligner checkpoints. See the README section "Use the result".

One module per direction: :mod:`.read` (training outputs, NeMo archives), :mod:`.to_diffusers`,
:mod:`.to_nemo`, :mod:`.from_nemo`, :mod:`.to_nemo_lora`; :mod:`.output` is how they all write,
:mod:`.lora` / :mod:`.lora_io` the diffusers LoRA file, :mod:`.ldm_layout` the NeMo key layouts and
:mod:`.nemo_adapters` NeMo-Aligner's LoRA adapter layout."""
from .ldm_layout import ConversionError  # noqa: F401
from .lora import export_lora  # noqa: F401
