"""diffusers LoRA → NeMo-Aligner DRaFT+ adapters (``nad-convert to-nemo-lora``), the inverse of
``from-nemo-lora``: what NeMo's ``load_adapters`` (and NeMo-Aligner's ``model.peft.restore_from_path``)
reads.

* ``OUT.nemo``: a tar of ``./model_config.yaml`` and ``./model_weights.ckpt``, packed as NeMo packs a
  folder (``tarfile.open(filename, "w:")``, ``tar.add(source_dir, arcname=".")``; NeMo v2.1.0
  nemo/core/connectors/save_restore_connector.py:588-592). The weights file is ``torch.save`` of the
  adapter state dict (``_save_state_dict_to_disk``, :682-683; a PEFT model's ``state_dict()`` is its
  adapters only, nlp_adapter_mixins.py:446-451). ``load_adapters`` infers the scheme from
  ``conf.peft.peft_scheme`` and builds ``SDLoraPEFTConfig(conf)`` from ``conf.peft.lora_tuning``
  (ddpm.py:2340-2351; peft_config.py:394-408 reads adapter_dim, adapter_dropout and network_alpha as
  attributes, so they are written).
* ``OUT.ckpt``: ``{"state_dict": adapters, "hyper_parameters": {"cfg": config}}`` — ``load_adapters``
  reads ``torch.load(filepath)['state_dict']`` (ddpm.py:2342-2343).

Tensors are written as they are: import → export gives back the original adapter tensors bit for bit.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

from ..errors import InputError
from .ldm_layout import ConversionError
from .lora import WEIGHT_NAME
from .lora_io import lora_scale, read_lora
from .nemo_adapters import peft_to_nemo
from .output import atomic_output, write_nemo_tar
from .read import check_nemo_family, check_pipeline, load_denoiser, load_trained_unet

# ModelPT writes the instance's class path as ``target`` (modelPT.py:118-121): NeMo-Aligner's DRaFT+ models
NEMO_ALIGNER_TARGETS = {
    "sd": "nemo_aligner.models.mm.stable_diffusion.megatron_sd_draftp_model.MegatronSDDRaFTPModel",
    "sdxl": "nemo_aligner.models.mm.stable_diffusion.megatron_sdxl_draftp_model.MegatronSDXLDRaFTPModel",
}
# the release whose on-disk layout this follows (ModelPT adds package_info.__version__, modelPT.py:124-126)
NEMO_VERSION = "2.1.0"


def _is_lora_file(path: str) -> bool:
    return (os.path.isfile(path) and path.endswith(".safetensors")) or \
        (os.path.isdir(path) and os.path.isfile(os.path.join(path, WEIGHT_NAME)))


def _lora_of(source: str, base: Optional[str]):
    """(peft state dict, r, lora_alpha, UNet without adapters, family) of a diffusers LoRA file or a
    training output of ours."""
    if _is_lora_file(source):
        base = check_pipeline(base, "--base (the base pipeline of the LoRA file)")
        family = check_nemo_family(base)
        state, config = read_lora(source, expected="unet")  # NeMo's SD LoRA is a UNet's
        lora_scale(config)  # refuses per-module rank/alpha patterns
        r, alpha = int(config["r"]), float(config["lora_alpha"])
        return state, r, alpha, load_denoiser(base, family), family
    from peft.utils import get_peft_model_state_dict

    unet, _, base = load_trained_unet(source, base)
    family = check_nemo_family(base)
    if not getattr(unet, "peft_config", None):
        raise ConversionError(f"{source!r} is a full fine-tune (model.peft.peft_scheme none): there are no "
                              f"adapters to write; use to-nemo for the whole model")
    adapter = next(iter(unet.peft_config))
    config = unet.peft_config[adapter]
    if config.rank_pattern or config.alpha_pattern:
        raise ConversionError(f"{source!r}: per-module rank/alpha patterns have no NeMo equivalent")
    state = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(unet, adapter_name=adapter).items()}
    return state, int(config.r), float(config.lora_alpha), load_denoiser(base, family), family


def nemo_lora_config(rank: int, lora_alpha: float, family: str) -> dict:
    """The model config of a NeMo-Aligner PEFT checkpoint: ``target``, ``nemo_version`` and the
    ``peft`` section of NeMo-Aligner's draftp_sd.yaml (examples/mm/stable_diffusion/conf/draftp_sd.yaml,
    ``model.peft``). network_alpha is null when lora_alpha = r (NeMo's scale 1), the number otherwise."""
    network_alpha = None if float(lora_alpha) == float(rank) else float(lora_alpha)
    return {
        "target": NEMO_ALIGNER_TARGETS.get(family, NEMO_ALIGNER_TARGETS["sd"]),
        "nemo_version": NEMO_VERSION,
        "peft": {
            "peft_scheme": "sdlora",
            "restore_from_path": None,
            "lora_tuning": {
                "adapter_dim": int(rank),
                "adapter_dropout": 0.0,
                "column_init_method": "xavier",
                "row_init_method": "zero",
                "layer_selection": None,
                "weight_tying": False,
                "position_embedding_strategy": None,
                "network_alpha": network_alpha,
            },
        },
    }


def lora_to_nemo_adapters(source: str, base: Optional[str] = None, with_reference: bool = False,
                          fill_missing: bool = False) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(NeMo adapter state dict, model config) of a diffusers LoRA or a training output."""
    state, r, alpha, unet, family = _lora_of(source, base)
    adapters, rank, _ = peft_to_nemo(state, unet, with_reference=with_reference, fill_missing=fill_missing)
    if rank != r:
        raise ConversionError(f"{source!r}: the adapter config says r={r}, the factors have rank {rank}")
    return adapters, nemo_lora_config(rank, alpha, family)


def export_nemo_lora(source: str, out_file: str, base: Optional[str] = None, with_reference: bool = False,
                     fill_missing: bool = False) -> str:
    """diffusers LoRA (``pytorch_lora_weights.safetensors`` or its directory; ``--base`` required) or a
    training output → NeMo-Aligner adapters in ``out_file`` (``.nemo`` or ``.ckpt``)."""
    ext = os.path.splitext(out_file)[1]
    if ext not in (".nemo", ".ckpt"):
        raise InputError("out", f"{out_file!r}: the output must end in .nemo (NeMo archive) or .ckpt (state dict)")
    adapters, config = lora_to_nemo_adapters(source, base, with_reference, fill_missing)
    with atomic_output(out_file, is_dir=False) as tmp:
        if ext == ".ckpt":
            torch.save({"state_dict": adapters, "hyper_parameters": {"cfg": config}}, tmp)
        else:
            write_nemo_tar(tmp, config, adapters)
    return out_file
