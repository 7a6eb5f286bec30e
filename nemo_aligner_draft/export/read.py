"""Reading what the converters start from: our training outputs (a run directory, its ``*.ckpt``, our
``.nemo``), NeMo Stable Diffusion archives (``.nemo`` tar of ``model_config.yaml`` +
``model_weights.ckpt``, or a bare ``.ckpt``) and the diffusers pipeline directory they refer to.

Nothing here writes; every problem is raised before a converter creates its output.
"""
from __future__ import annotations

import io
import os
import tarfile
from typing import Dict, Optional, Tuple

import torch

from ..backends import detect_family, get_family, lora_targets
from ..backends.base import lora_config
from ..errors import InputError
from ..files import safe_torch_load
from .ldm_layout import ConversionError


def _load_weights(fileobj_or_path) -> Dict[str, torch.Tensor]:
    state = torch.load(fileobj_or_path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConversionError("checkpoint is not a state dict of tensors (expected a dict, or a dict with "
                              "'state_dict')")
    return state


def load_lightning_checkpoint(path: str) -> dict:
    """A Lightning ``.ckpt``, read with the package's one allow-list (:func:`..files.safe_torch_load`)."""
    return safe_torch_load(path, what="checkpoint")


def read_nemo_archive(path: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(model_config dict, weights) of a ``.nemo`` tar, or ({}, weights) of a bare ``.ckpt``."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    if not tarfile.is_tarfile(path):
        return {}, _load_weights(path)
    with tarfile.open(path) as tar:
        # NeMo writes members as "./name", other tools as "name": match on the base name.
        members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
        for need in ("model_config.yaml", "model_weights.ckpt"):
            if need not in members:
                raise ConversionError(f"{path!r}: .nemo archive has no {need} (members: {sorted(members)[:10]})")
        config = yaml.safe_load(tar.extractfile(members["model_config.yaml"]).read()) or {}
        weights = _load_weights(io.BytesIO(tar.extractfile(members["model_weights.ckpt"]).read()))
    return config, weights


def check_pipeline(base: Optional[str], what: str) -> str:
    """``base`` if it is a diffusers pipeline directory; otherwise the fault of ``--base`` (or of the
    run's ``model.pretrained`` it defaults to, which ``what`` names)."""
    if not base or not os.path.isfile(os.path.join(base, "model_index.json")):
        raise InputError("--base", f"{base!r} is not a diffusers pipeline directory (no model_index.json; {what})")
    return base


def load_denoiser(pipeline_dir: str, family: Optional[str] = None):
    """The denoising network of a diffusers pipeline directory, of the class its model family names."""
    import diffusers

    fam = get_family(family or detect_family(pipeline_dir))
    return getattr(diffusers, fam.denoiser_class).from_pretrained(pipeline_dir, subfolder=fam.denoiser_subfolder,
                                                                 local_files_only=True)


def _run_config(path: str) -> dict:
    """The ``model`` config a run saved next to its checkpoints (``path``: the run dir or a ``.ckpt`` in it)."""
    import yaml

    if os.path.isdir(path):
        run_dir = path
    else:
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))  # <run>/checkpoints/x.ckpt
    cfg_file = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            return (yaml.safe_load(f) or {}).get("model", {})
    return {}


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
    from ..config.schema import PeftConfig

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
        mcfg = _run_config(path)
        if not mcfg:
            raise ConversionError(f"{path!r}: no config.yaml in its run directory (expected <run>/config.yaml next "
                                  f"to <run>/checkpoints/)")
    base = check_pipeline(base or mcfg.get("pretrained"), "base model (model.pretrained or --base)")
    family = detect_family(base)
    unet = load_denoiser(base, family)
    # A saved config may predate a key; what training would have used for it is the schema's default.
    defaults = PeftConfig()
    peft = mcfg.get("peft", {}) or {}
    scheme = peft.get("peft_scheme", defaults.peft_scheme)
    if scheme != "none":
        lt = peft.get("lora_tuning", {}) or {}
        targets = lt.get("target_modules") or lora_targets(family, scheme)
        unet.add_adapter(lora_config(lt.get("adapter_dim", defaults.lora_tuning.adapter_dim),
                                     lt.get("network_alpha", defaults.lora_tuning.network_alpha), targets))
    own = unet.state_dict()
    # the training module registers the network as its ``unet`` attribute, whatever the family
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
