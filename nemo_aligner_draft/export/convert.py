"""Checkpoint conversion, every direction through one module:

* our training output (``*.ckpt`` with trainable weights + ``alignment_state``, a run directory, or
  our ``.nemo``) → a diffusers pipeline directory with the LoRA merged, LoRA-only safetensors, or a
  NeMo Stable Diffusion ``.nemo`` (UNet/VAE in NeMo's LDM layout);
* a NeMo Stable Diffusion checkpoint (``.nemo`` tar with ``model_config.yaml`` + ``model_weights.ckpt``,
  or a bare ``.ckpt``) → a diffusers pipeline directory (the text encoder, tokenizer, scheduler and
  the architecture configs come from ``base``, a diffusers pipeline of the same architecture);
* NeMo-Aligner DRaFT+ LoRA adapters (``ParallelLinearAdapter`` ``linear_in`` [r, in] /
  ``linear_out`` [out, r], output scaled by alpha/r) → diffusers LoRA safetensors.

Outputs are assembled in a temporary sibling and renamed into place, so a failure leaves nothing.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from contextlib import contextmanager
from typing import Dict, Optional, Tuple

import torch

from ..errors import InputError
from .ldm_layout import (
    UNET_PREFIXES,
    VAE_PREFIXES,
    ConversionError,
    strip_prefix,
    unet_from_nemo,
    unet_key_map,
    unet_to_nemo,
    vae_from_nemo,
    vae_to_nemo,
)

NEMO_UNET_PREFIX = "model.model.diffusion_model."  # MegatronLatentDiffusion → LatentDiffusion → wrapper
NEMO_VAE_PREFIX = "model.first_stage_model."


# ----------------------------------------------------------------------------- atomic output
@contextmanager
def atomic_output(path: str, is_dir: bool):
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds."""
    path = os.path.abspath(path)
    if os.path.exists(path) and (not is_dir or os.listdir(path)):
        raise InputError("out", f"{path!r} already exists; remove it or choose another path")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    tmp = tmp_dir if is_dir else os.path.join(tmp_dir, os.path.basename(path))
    try:
        yield tmp
        if is_dir and os.path.isdir(path):
            os.rmdir(path)  # empty (checked above)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- reading inputs
def _load_weights(fileobj_or_path) -> Dict[str, torch.Tensor]:
    state = torch.load(fileobj_or_path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConversionError("checkpoint is not a state dict of tensors (expected a dict, or a dict with "
                              "'state_dict')")
    return state


def load_lightning_checkpoint(path: str) -> dict:
    """``torch.load(weights_only=True)`` of a Lightning ``.ckpt``: its ``hyper_parameters`` are OmegaConf
    containers, so those plain-data classes (and nothing that can run code) are allow-listed."""
    import collections
    import typing

    from omegaconf import DictConfig, ListConfig, nodes
    from omegaconf.base import ContainerMetadata, Metadata

    allowed = [dict, list, int, float, str, bool, collections.defaultdict, DictConfig, ListConfig, ContainerMetadata, Metadata, typing.Any, nodes.AnyNode, nodes.StringNode,
               nodes.IntegerNode, nodes.FloatNode, nodes.BooleanNode]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_nemo_archive(path: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(model_config dict, weights) of a ``.nemo`` tar, or ({}, weights) of a bare ``.ckpt``."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    if not tarfile.is_tarfile(path):
        return {}, _load_weights(path)
    with tarfile.open(path) as tar:
        members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
        for need in ("model_config.yaml", "model_weights.ckpt"):
            if need not in members:
                raise ConversionError(f"{path!r}: .nemo archive has no {need} (members: {sorted(members)[:10]})")
        config = yaml.safe_load(tar.extractfile(members["model_config.yaml"]).read()) or {}
        weights = _load_weights(io.BytesIO(tar.extractfile(members["model_weights.ckpt"]).read()))
    return config, weights


def _check_pipeline(base: Optional[str], what: str) -> str:
    if not base or not os.path.isfile(os.path.join(base, "model_index.json")):
        raise InputError("--base", f"{base!r} is not a diffusers pipeline directory (no model_index.json; {what})")
    return base


def _run_config(path: str) -> Tuple[dict, Optional[str]]:
    """The ``model`` config of a training output (``.ckpt``: run dir's config.yaml; run dir; our .nemo)."""
    import yaml

    if os.path.isdir(path):
        run_dir = path
    else:
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))  # <run>/checkpoints/x.ckpt
    cfg_file = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            return (yaml.safe_load(f) or {}).get("model", {}), run_dir
    return {}, None


def _latest_checkpoint(run_dir: str) -> str:
    ck = os.path.join(run_dir, "checkpoints")
    files = sorted(f for f in os.listdir(ck) if f.endswith(".ckpt")) if os.path.isdir(ck) else []
    last = [f for f in files if f.endswith("-last.ckpt")]
    if not files:
        raise FileNotFoundError(f"run directory {run_dir!r} has no checkpoints/*.ckpt")
    return os.path.join(ck, (last or files)[-1])


def load_trained_unet(path: str, base: Optional[str] = None):
    """The trained UNet (with its peft LoRA adapter if the run used one) of a training output.

    ``path``: a ``*.ckpt`` written by our runs, its run directory, or our ``.nemo``. ``base``
    overrides ``model.pretrained`` from the saved config. Returns (unet, model_cfg, base_dir).
    """
    from diffusers import UNet2DConditionModel

    if os.path.isdir(path):
        path = _latest_checkpoint(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    if tarfile.is_tarfile(path):
        mcfg, state = read_nemo_archive(path)
    else:
        raw = load_lightning_checkpoint(path)
        if not isinstance(raw, dict) or "state_dict" not in raw or "alignment_state" not in raw:
            raise ConversionError(f"{path!r} is not a nemo_aligner_draft training checkpoint (expected keys "
                                  f"'state_dict' and 'alignment_state', got {sorted(raw)[:10] if isinstance(raw, dict) else type(raw).__name__})")
        state = raw["state_dict"]
        mcfg, _ = _run_config(path)
        if not mcfg:
            raise ConversionError(f"{path!r}: no config.yaml in its run directory (expected <run>/config.yaml next "
                                  f"to <run>/checkpoints/)")
    base = _check_pipeline(base or mcfg.get("pretrained"), "base model (model.pretrained or --base)")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", local_files_only=True)
    peft = mcfg.get("peft", {}) or {}
    scheme = peft.get("peft_scheme", "sdlora")
    if scheme != "none":
        from peft import LoraConfig

        from ..backends.base import LORA_TARGETS

        lt = peft.get("lora_tuning", {}) or {}
        targets = lt.get("target_modules") or LORA_TARGETS[scheme]
        unet.add_adapter(LoraConfig(r=int(lt.get("adapter_dim", 32)), lora_alpha=float(lt.get("network_alpha", 32.0)),
                                    target_modules=list(targets), init_lora_weights=True))
    own = unet.state_dict()
    unet_state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    wanted = [k for k in own if "lora_" in k] if scheme != "none" else list(own)
    missing = sorted(k for k in wanted if k not in unet_state)
    unexpected = sorted(k for k in unet_state if k not in own)
    shapes = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in unet_state.items()
              if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ConversionError(f"{path!r} does not match the UNet of {base!r} with peft_scheme={scheme!r}: "
                              f"{len(missing)} missing (e.g. {missing[:10]}), {len(unexpected)} unexpected "
                              f"(e.g. {unexpected[:10]}), {len(shapes)} shape mismatches (e.g. {shapes[:10]})")
    unet.load_state_dict(unet_state, strict=False)
    unet.eval()
    return unet, mcfg, base


def merged_unet(unet, scale: float = 1.0):
    """A plain ``UNet2DConditionModel`` with W + scale·(alpha/r)·B A folded into every LoRA layer."""
    from diffusers import UNet2DConditionModel
    from peft.tuners.lora import LoraLayer

    plain = UNet2DConditionModel.from_config(unet.config)
    state = {}
    lora_modules = {name: m for name, m in unet.named_modules() if isinstance(m, LoraLayer)}
    for key, value in unet.state_dict().items():
        if "lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value.clone()
    for name, m in lora_modules.items():
        for adapter in m.active_adapters:
            if adapter not in m.lora_A:
                continue
            a, b = m.lora_A[adapter].weight.double(), m.lora_B[adapter].weight.double()
            s = m.scaling[adapter] * scale
            w = state[f"{name}.weight"]
            delta = s * (b @ a) if a.ndim == 2 else s * torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
            state[f"{name}.weight"] = (w.double() + delta).to(w.dtype)
    plain.load_state_dict(state, strict=True)
    return plain


def _family(base: str) -> str:
    with open(os.path.join(base, "model_index.json")) as f:
        return "sdxl" if "text_encoder_2" in json.load(f) else "sd"


# ----------------------------------------------------------------------------- export
def export_diffusers(path: str, out_dir: str, base: Optional[str] = None, lora_scale: float = 1.0) -> str:
    """Training output → full diffusers pipeline directory with the LoRA merged into the UNet.
    The frozen components (text encoders, VAE, tokenizers, scheduler) are copied from ``base``."""
    unet, _, base = load_trained_unet(path, base)
    plain = merged_unet(unet, lora_scale) if getattr(unet, "peft_config", None) else unet
    with atomic_output(out_dir, is_dir=True) as tmp:
        shutil.copytree(base, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("unet"))
        plain.save_pretrained(os.path.join(tmp, "unet"), safe_serialization=True)
    return out_dir


def export_lora_file(path: str, out_dir: str, base: Optional[str] = None) -> str:
    """Training output → ``out_dir/pytorch_lora_weights.safetensors`` (diffusers ``load_lora_weights``)."""
    from .lora import export_lora

    unet, _, base = load_trained_unet(path, base)
    with atomic_output(out_dir, is_dir=True) as tmp:
        export_lora(unet, tmp, family=_family(base))
    return os.path.join(out_dir, "pytorch_lora_weights.safetensors")


def _unet_and_vae(source: str, base: Optional[str]):
    """(merged UNet, VAE, base dir) of a training output or a diffusers pipeline directory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ..backends.base import load_vae

    if os.path.isfile(os.path.join(source, "model_index.json")):
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", local_files_only=True)
        base = source
    else:
        unet, _, base = load_trained_unet(source, base)
        if getattr(unet, "peft_config", None):
            unet = merged_unet(unet)
    vae = load_vae(base)
    if not isinstance(vae, AutoencoderKL):
        raise ValueError(f"{os.path.join(base, 'vae')}: the NeMo/LDM checkpoint layout holds an AutoencoderKL VAE, "
                         f"this pipeline's VAE is {type(vae).__name__}; export its UNet as a diffusers pipeline "
                         f"or LoRA instead")
    return unet, vae, base


def export_nemo(source: str, out_file: str, base: Optional[str] = None, layout: str = "ldm") -> str:
    """Training output or diffusers pipeline → NeMo Stable Diffusion ``.nemo`` (tar of
    ``model_config.yaml`` + ``model_weights.ckpt``; UNet under ``model.model.diffusion_model.``, VAE
    under ``model.first_stage_model.``, in NeMo's ``layout``)."""
    import yaml

    unet, vae, base = _unet_and_vae(source, base)
    weights = {NEMO_UNET_PREFIX + k: v.contiguous() for k, v in unet_to_nemo(unet.state_dict(), unet.config, layout).items()}
    weights.update({NEMO_VAE_PREFIX + k: v.contiguous() for k, v in vae_to_nemo(vae.state_dict(), vae.config, layout).items()})
    config = {"unet_config": {"from_NeMo": layout == "ldm", "layout": layout,
                              "diffusers_config": json.loads(json.dumps(dict(unet.config), default=list))},
              "first_stage_config": {"diffusers_config": json.loads(json.dumps(dict(vae.config), default=list))},
              "scale_factor": float(vae.config.scaling_factor), "converted_by": "nemo_aligner_draft"}
    with atomic_output(out_file, is_dir=False) as tmp, tempfile.TemporaryDirectory() as work:
        with open(os.path.join(work, "model_config.yaml"), "w") as f:
            yaml.safe_dump(config, f)
        torch.save(weights, os.path.join(work, "model_weights.ckpt"))
        with tarfile.open(tmp, "w") as tar:
            for name in ("model_config.yaml", "model_weights.ckpt"):
                tar.add(os.path.join(work, name), arcname=f"./{name}")
    return out_file


# ----------------------------------------------------------------------------- import
def import_nemo(path: str, base: str, out_dir: str, layout: Optional[str] = None) -> str:
    """NeMo Stable Diffusion ``.nemo``/``.ckpt`` → diffusers pipeline directory.

    UNet (and the VAE when the checkpoint holds one) come from ``path``; everything else and the
    architecture come from ``base``. Every UNet/VAE key and shape is checked before anything is written.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ..backends.base import load_vae

    base = _check_pipeline(base, "--base")
    _, weights = read_nemo_archive(path)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", local_files_only=True)
    nemo_unet = strip_prefix(weights, UNET_PREFIXES, "input_blocks.0.0.weight")
    unet.load_state_dict(unet_from_nemo(nemo_unet, unet.state_dict(), unet.config, layout), strict=True)
    vae = None
    if any(p + "decoder.conv_in.weight" in weights for p in VAE_PREFIXES if p):
        vae = load_vae(base)
        if not isinstance(vae, AutoencoderKL):
            raise ValueError(f"{path} holds an LDM (AutoencoderKL) VAE but --base {base} has a {type(vae).__name__} VAE")
        nemo_vae = strip_prefix(weights, [p for p in VAE_PREFIXES if p], "decoder.conv_in.weight")
        vae.load_state_dict(vae_from_nemo(nemo_vae, vae.state_dict(), vae.config), strict=True)
    with atomic_output(out_dir, is_dir=True) as tmp:
        skip = ["unet"] + (["vae"] if vae is not None else [])
        shutil.copytree(base, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*skip))
        unet.save_pretrained(os.path.join(tmp, "unet"), safe_serialization=True)
        if vae is not None:
            vae.save_pretrained(os.path.join(tmp, "vae"), safe_serialization=True)
    return out_dir


_ADAPTER = re.compile(r"^(?P<module>.+?)\.adapter_layer\.[^.]+\.linear_(?P<which>in|out)\.weight$")


def nemo_lora_to_diffusers(weights: Dict[str, torch.Tensor], unet_config, unet_keys, alpha: Optional[float]):
    """NeMo-Aligner ``ParallelLinearAdapter`` weights → (peft LoRA state dict, LoraConfig).

    NeMo computes y = W x + (alpha/r)·linear_out(linear_in(x)); with lora_A = linear_in ``[r, in]``,
    lora_B = linear_out ``[out, r]`` and peft's scale lora_alpha/r the update ΔW = (alpha/r)·B A is
    the same. ``alpha`` None means NeMo's default alpha = r.
    """
    from peft import LoraConfig

    found: Dict[str, Dict[str, torch.Tensor]] = {}
    other = []
    for key, value in weights.items():
        m = _ADAPTER.match(key)
        if m is None:
            other.append(key)
            continue
        found.setdefault(m["module"], {})[m["which"]] = value
    if not found:
        raise ConversionError(f"no NeMo adapter weights ('<module>.adapter_layer.<name>.linear_in.weight') among "
                              f"{len(weights)} keys, e.g. {sorted(weights)[:10]}")
    inv = {v: k for k, v in unet_key_map(unet_keys, unet_config, "ldm").items()}
    state, bad, ranks = {}, [], set()
    for module, pair in found.items():
        stripped = next((module[len(p):] for p in UNET_PREFIXES if p and module.startswith(p)), module)
        target = inv.get(stripped + ".weight") or inv.get(stripped + ".0.weight")
        if target is None or set(pair) != {"in", "out"}:
            bad.append(module)
            continue
        a, b = pair["in"], pair["out"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            bad.append(f"{module}: linear_in {tuple(a.shape)}, linear_out {tuple(b.shape)}")
            continue
        name = target[: -len(".weight")]
        state[f"{name}.lora_A.weight"] = a.float().contiguous()
        state[f"{name}.lora_B.weight"] = b.float().contiguous()
        ranks.add(int(a.shape[0]))
    if bad:
        raise ConversionError(f"{len(bad)} NeMo adapters do not map onto the base UNet (unknown module, missing "
                              f"linear_in/linear_out or inconsistent rank), e.g. {bad[:10]}")
    if len(ranks) != 1:
        raise ConversionError(f"NeMo adapters have different ranks {sorted(ranks)}; expected one adapter_dim")
    r = ranks.pop()
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    config = LoraConfig(r=r, lora_alpha=float(alpha if alpha is not None else r), target_modules=targets)
    return state, config


def import_nemo_lora(path: str, base: str, out_dir: str, alpha: Optional[float] = None) -> str:
    """NeMo-Aligner DRaFT+ LoRA (``.nemo`` or ``.ckpt``) → ``out_dir/pytorch_lora_weights.safetensors``.
    ``alpha``: the run's ``model.peft.lora_tuning.network_alpha`` (read from the .nemo config if omitted)."""
    from diffusers import (
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    base = _check_pipeline(base, "--base")
    config, weights = read_nemo_archive(path)
    if alpha is None:
        alpha = ((config.get("peft") or {}).get("lora_tuning") or {}).get("network_alpha")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", local_files_only=True)
    own = unet.state_dict()
    state, lcfg = nemo_lora_to_diffusers(weights, unet.config, own.keys(), alpha)
    shapes = [f"{k}: {tuple(v.shape)}" for k, v in state.items()
              if (k.endswith("lora_A.weight") and v.shape[1] != own[k.rsplit(".lora_", 1)[0] + ".weight"].shape[1])
              or (k.endswith("lora_B.weight") and v.shape[0] != own[k.rsplit(".lora_", 1)[0] + ".weight"].shape[0])]
    if shapes:
        raise ConversionError(f"{len(shapes)} adapter factors do not fit the base UNet's layers, e.g. {shapes[:10]}")
    pipe = StableDiffusionXLPipeline if _family(base) == "sdxl" else StableDiffusionPipeline
    with atomic_output(out_dir, is_dir=True) as tmp:
        pipe.save_lora_weights(tmp, unet_lora_layers=state, weight_name="pytorch_lora_weights.safetensors",
                               safe_serialization=True, unet_lora_adapter_metadata=lcfg.to_dict())
    return os.path.join(out_dir, "pytorch_lora_weights.safetensors")
