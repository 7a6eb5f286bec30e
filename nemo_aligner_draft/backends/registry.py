"""Which model families exist, and how a pipeline directory is recognised: one :class:`Family` entry each.

A family entry names everything the rest of the package needs to know about it — the diffusers
pipeline classes that identify it (``model_index.json``'s ``_class_name``), the backend class, the LoRA
target modules of each ``peft_scheme``, the default sampler, and the classes an export writes (the
pipeline class whose ``save_lora_weights`` / ``from_pretrained`` fit, the denoiser class and its
subfolder). Adding a family is one backend file plus one ``register_family`` call.

Backends are named as ``"module:Class"`` and imported on first use, so this module imports no backend
and no backend imports it: the dependency goes one way.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .base import DiffusionBackend, check_pipeline_dir

# NeMo's "sdlora" (``SDLoraPEFTConfig``, NeMo v2.1.0 nemo/collections/nlp/parts/peft_config.py:392) puts a
# ParallelLinearAdapter on every ``LinearWrapper`` of the UNet (``_check_and_add_adapter``,
# nemo/collections/multimodal/models/text_to_image/stable_diffusion/ldm/ddpm.py:2282-2295; every other
# module is skipped). In nemo/collections/multimodal/modules/stable_diffusion/attention.py those are, in
# each BasicTransformerBlock (one per transformer layer of every SpatialTransformer):
#
#   NeMo module (attention.py line)                         diffusers module
#   attn1.to_q / attn2.to_q           (297)                 attn1.to_q / attn2.to_q
#   attn1.to_k / attn2.to_k           (285)                 attn1.to_k / attn2.to_k
#   attn1.to_v / attn2.to_v           (286)                 attn1.to_v / attn2.to_v
#   attn1.to_out.0 / attn2.to_out.0   (299-301)             attn1.to_out.0 / attn2.to_out.0
#   ff.net.1.proj  (GEGLU.proj, 106; FeedForward.net, 130)  ff.net.0.proj
#   ff.net.3       (FeedForward.net, 130)                   ff.net.2
#
# Not adapted: proj_in/proj_out (plain nn.Linear / nn.Conv2d, 549/572), resnets, time embedding, VAE and
# text encoder. The peft suffixes below match exactly these modules of a diffusers UNet2DConditionModel
# (tests/export/test_nemo_lora.py asserts the list). "lora" is accepted as the same set: NeMo-Aligner's
# "lora" maps to the GPT LoraPEFTConfig, which names no Stable Diffusion module.
_NEMO_SD_LORA = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
_UNET_LORA = {
    "sdlora": list(_NEMO_SD_LORA),
    "lora": list(_NEMO_SD_LORA),
}


@dataclass(frozen=True)
class Family:
    name: str
    backend: str  # "package.module:Class", a DiffusionBackend subclass with a from_pretrained(path, dtype)
    pipeline_classes: Tuple[str, ...]  # model_index.json _class_name values that mean this family
    pipeline_class: Optional[str]  # the diffusers pipeline an export writes / loads LoRA with (None: none)
    lora_targets: Dict[str, List[str]] = field(default_factory=lambda: dict(_UNET_LORA))
    default_sampler: str = "ddim"
    denoiser_class: str = "UNet2DConditionModel"  # diffusers class of the trained network
    denoiser_subfolder: str = "unet"
    nemo_checkpoints: bool = False  # NeMo (and NeMo-Aligner) had SD checkpoints of this family: the .nemo converters apply

    def backend_class(self) -> type:
        module, _, name = self.backend.partition(":")
        return getattr(importlib.import_module(module), name)


FAMILIES: Dict[str, Family] = {}


def register_family(family: Family) -> Family:
    if family.name in FAMILIES or family.name == "auto":
        raise ValueError(f"model family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


register_family(Family(
    "sd", "nemo_aligner_draft.backends.sd:SDBackend", ("StableDiffusionPipeline",), "StableDiffusionPipeline",
    default_sampler="ddim", nemo_checkpoints=True))
register_family(Family(
    "sdxl", "nemo_aligner_draft.backends.sdxl:SDXLBackend", ("StableDiffusionXLPipeline",),
    "StableDiffusionXLPipeline", default_sampler="euler", nemo_checkpoints=True))

# FLUX: the default ``--lora_layers`` of diffusers' examples/dreambooth/train_dreambooth_lora_flux.py (the
# attention projections of both streams and both feed-forwards of every double-stream block). As peft
# suffixes, "attn.to_q/k/v" also match the single-stream blocks' attention, which has no to_out (its output
# goes through the block's fused proj_out with the MLP, not adapted, nor is proj_mlp), and "ff.net.2" does not
# match "ff_context.net.2" (peft matches whole dotted components). tests/backends/test_flux.py asserts the set.
_FLUX_LORA = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
              "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
              "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
register_family(Family(
    "flux", "nemo_aligner_draft.backends.flux:FluxBackend", ("FluxPipeline",), "FluxPipeline",
    lora_targets={"sdlora": list(_FLUX_LORA), "lora": list(_FLUX_LORA)}, default_sampler="flow",
    denoiser_class="FluxTransformer2DModel", denoiser_subfolder="transformer"))

# SD3: the default ``--lora_layers`` of diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py (huggingface/
# diffusers 58eb52c, lines 1248-1260): the attention projections of both streams of every joint block. As peft suffixes,
# "attn.to_q" matches no "attn2.to_q" (SD3.5's extra image self-attention, left out as the script does) and the
# last block's context_pre_only attention simply has no to_add_out. tests/backends/test_sd3.py asserts the set.
_SD3_LORA = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
             "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]
register_family(Family(
    "sd3", "nemo_aligner_draft.backends.sd3:SD3Backend", ("StableDiffusion3Pipeline",), "StableDiffusion3Pipeline",
    lora_targets={"sdlora": list(_SD3_LORA), "lora": list(_SD3_LORA)}, default_sampler="flow",
    denoiser_class="SD3Transformer2DModel", denoiser_subfolder="transformer"))


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r} (known: {', '.join(['auto', *FAMILIES])})")
    return FAMILIES[name]


def detect_family(path: str) -> str:
    """The family of a local diffusers pipeline directory, from its ``model_index.json`` ``_class_name``."""
    index = check_pipeline_dir(path)
    name = index.get("_class_name")
    for fam in FAMILIES.values():
        if name in fam.pipeline_classes:
            return fam.name
    known = sorted(c for fam in FAMILIES.values() for c in fam.pipeline_classes)
    raise ValueError(f"{path!r}: model_index.json names pipeline class {name!r}, which no model family handles "
                     f"(known: {', '.join(known)})")


def lora_targets(family_name: str, scheme: str) -> List[str]:
    targets = get_family(family_name).lora_targets
    if scheme not in targets:
        raise ValueError(f"model family {family_name!r} has no LoRA scheme {scheme!r} (known: {sorted(targets)})")
    return list(targets[scheme])


def load_backend(path: str, family: str = "auto", frozen_dtype: torch.dtype = torch.float32) -> DiffusionBackend:
    """The backend of the pipeline at ``path``; ``family`` ``auto`` reads it from model_index.json."""
    fam = get_family(detect_family(path) if family == "auto" else family)
    backend = fam.backend_class().from_pretrained(path, frozen_dtype)
    backend.family_spec = fam
    backend.default_sampler = fam.default_sampler
    return backend


def family_of(backend: DiffusionBackend) -> Optional[Family]:
    return getattr(backend, "family_spec", None) or FAMILIES.get(backend.family)
