"""Reading what the converters start from: our training outputs (a run directory, its ``*.ckpt``, our
``.nemo``), NeMo / NeMo-Aligner archives (``.nemo`` tar of ``model_config.yaml`` +
``model_weights.ckpt``, a Lightning ``.ckpt`` with its OmegaConf ``hyper_parameters``, or a bare state
dict) and the diffusers pipeline directory they refer to.

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


# What peft_scheme sdlora adapted before it followed NeMo's SDLoraPEFTConfig (attention projections only):
# checkpoints of such runs still convert.
LEGACY_SDLORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def load_lightning_checkpoint(path: str) -> dict:
    """A Lightning ``.ckpt``, read with the package's one allow-list (:func:`..files.safe_torch_load`)."""
    return safe_torch_load(path, what="checkpoint")


def _tensor_state(obj, what: str) -> Dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ConversionError(f"{what} is not a state dict of tensors (expected a dict, or a dict with 'state_dict')")
    return obj


def _plain(node):
    """An OmegaConf container (a Lightning checkpoint's ``hyper_parameters``) as plain dicts and lists."""
    from omegaconf import Container, OmegaConf

    if isinstance(node, Container):
        try:
            return OmegaConf.to_container(node, resolve=True)
        except Exception:  # an interpolation that pointed outside the saved node
            return OmegaConf.to_container(node, resolve=False)
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    return node


def checkpoint_config(raw) -> dict:
    """The model config of a Lightning checkpoint: ModelPT saves its cfg with
    ``save_hyperparameters("cfg")`` (NeMo v2.1.0 nemo/core/classes/modelPT.py:133), which Lightning
    writes as ``hyper_parameters["cfg"]`` (an OmegaConf DictConfig)."""
    hp = raw.get("hyper_parameters") if isinstance(raw, dict) else None
    if not isinstance(hp, dict) and not _is_container(hp):
        return {}
    cfg = _plain(hp)
    cfg = cfg.get("cfg", cfg) if isinstance(cfg, dict) else {}
    return cfg if isinstance(cfg, dict) else {}


def _is_container(obj) -> bool:
    from omegaconf import Container

    return isinstance(obj, Container)


def read_nemo_archive(path: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(model config dict, weights) of a ``.nemo`` tar, or of a ``.ckpt`` (a Lightning checkpoint: its
    ``hyper_parameters`` cfg; a bare state dict: ``{}``). Every file is read with ``weights_only=True``
    through the package's one allow-list (:func:`..files.safe_torch_load`)."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    if not tarfile.is_tarfile(path):
        raw = safe_torch_load(path, what="checkpoint")
        return checkpoint_config(raw), _tensor_state(raw, repr(path))
    with tarfile.open(path) as tar:  # NeMo writes "w:" (save_restore_connector.py:591); old .nemo are gzipped
        # NeMo writes members as "./name" (tar.add(dir, arcname=".")), other tools as "name": match base names
        found: Dict[str, list] = {}
        for m in tar.getmembers():
            if m.isfile():
                found.setdefault(os.path.basename(m.name), []).append(m)
        for need in ("model_config.yaml", "model_weights.ckpt"):
            if need not in found:
                hint = (" (a distributed checkpoint: model_weights/ is a directory, not supported)"
                        if need == "model_weights.ckpt" and any(m.name.rstrip("/").endswith("model_weights")
                                                                 for m in tar.getmembers()) else "")
                raise ConversionError(f"{path!r}: .nemo archive has no {need}{hint} (members: {sorted(found)[:10]})")
            if len(found[need]) > 1:
                raise ConversionError(f"{path!r}: .nemo archive has {len(found[need])} {need} "
                                      f"({[m.name for m in found[need]]}): a model-parallel checkpoint, not supported")
        config = yaml.safe_load(tar.extractfile(found["model_config.yaml"][0]).read()) or {}
        data = io.BytesIO(tar.extractfile(found["model_weights.ckpt"][0]).read())
    try:
        raw = safe_torch_load(data, what="model_weights.ckpt")
    except InputError as e:
        raise ConversionError(f"{path!r}: {e.message}") from e
    return config, _tensor_state(raw, f"{path!r}: model_weights.ckpt")


def check_pipeline(base: Optional[str], what: str) -> str:
    """``base`` if it is a diffusers pipeline directory; otherwise the fault of ``--base`` (or of the
    run's ``model.pretrained`` it defaults to, which ``what`` names)."""
    if not base or not os.path.isfile(os.path.join(base, "model_index.json")):
        raise InputError("--base", f"{base!r} is not a diffusers pipeline directory (no model_index.json; {what})")
    return base


def check_nemo_family(base: str) -> str:
    """The family of ``base`` if NeMo had Stable Diffusion checkpoints of it (SD, SDXL); otherwise one line
    naming the pipeline and what converts it instead."""
    fam = get_family(detect_family(base))
    if not fam.nemo_checkpoints:
        raise ConversionError(f"{base!r} holds a {fam.pipeline_class} ('{fam.name}' family): NeMo's Stable Diffusion "
                              f"checkpoints (.nemo, NeMo-Aligner adapters) are SD and SDXL UNets only; convert it "
                              f"with to-diffusers or to-lora")
    return fam.name


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
    # the training module registers the network as its ``unet`` attribute, whatever the family
    unet_state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    if scheme != "none":
        lt = peft.get("lora_tuning", {}) or {}
        targets = lt.get("target_modules") or lora_targets(family, scheme)
        adapted = {k.split(".lora_")[0] for k in unet_state if ".lora_A." in k}
        if not lt.get("target_modules") and scheme == "sdlora" and adapted and \
                any(t.startswith("ff.net.") for t in targets) and not any(".ff.net." in m for m in adapted):
            # a run from before sdlora adapted the feed-forward too (SD/SDXL); a family whose sdlora
            # targets are attention only (SD3) is not one
            targets = LEGACY_SDLORA_TARGETS
        unet.add_adapter(lora_config(lt.get("adapter_dim", defaults.lora_tuning.adapter_dim),
                                     lt.get("network_alpha", defaults.lora_tuning.network_alpha), targets))
    own = unet.state_dict()
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
