"""Training output or diffusers pipeline → NeMo Stable Diffusion ``.nemo`` (``nad-convert to-nemo``).

The archive is what NeMo's ``SaveRestoreConnector`` writes and ``restore_from`` reads (NeMo v2.1.0
nemo/core/connectors/save_restore_connector.py): an uncompressed tar (``"w:"``) of a folder added as
``"."`` (588-592) holding ``model_config.yaml`` and ``model_weights.ckpt`` (39-40), the latter a
``torch.save`` of the model's state dict (682-683). ``restore_from`` loads the YAML with OmegaConf
(158-159), builds ``calling_cls.from_config_dict(conf)`` (182) — the class named by ``target``
(nemo/core/classes/common.py ``from_config_dict``; a top-level ``_target_`` would be handed to hydra
instead, so there is none) — and loads the weights with ``strict=True`` in NeMo's inference setup
(nemo/collections/multimodal/parts/utils.py:219-224).

``model_config.yaml`` therefore carries every key the constructors read by attribute (a missing one
raises under OmegaConf's struct mode): :data:`SD_KEYS` lists them with their source lines. Stable
Diffusion 1.x/2.x is ``MegatronLatentDiffusion`` (UNet ``unet_config``, VAE ``first_stage_config``, CLIP
``cond_stage_config``); SDXL is ``MegatronDiffusionEngine`` (:data:`SDXL_KEYS`). The sub-configs use
NeMo's constructor argument names (``UNetModel``, ``AutoencoderKL``, ``FrozenCLIPEmbedder``), derived
from the diffusers configs; the diffusers configs themselves are kept under ``nemo_aligner_draft``, a key
NeMo ignores.

Weights (``layout="nemo"``, the default): NeMo's own module tree — the UNet as ``UNetModel`` names its
modules (``in_layers.1``/``out_layers.2``, ``out.1``, ``attn1.norm``, ``ff.net.1.proj``/``ff.net.3``:
the ``nemo_hf`` key map) under ``model.model.diffusion_model.``, the VAE with its mid-attention as the
1×1 convolutions NeMo's ``AttnBlock`` has (the ``ldm`` key map) under ``model.first_stage_model.``; for
SD the text encoder under ``model.cond_stage_model.transformer.`` (``FrozenCLIPEmbedder.transformer`` is
a ``CLIPTextModel``) and the DDPM schedule buffers ``model.betas`` … computed as NeMo's
``register_schedule`` computes them. ``ldm`` / ``nemo_hf`` write UNet and VAE in that key map only.

Nothing is dropped: every UNet/VAE tensor is mapped, read back through the inverse map and compared
bit for bit before anything is written; a tensor that does not come back is a ConversionError.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import torch

from ..errors import some
from .ldm_layout import (
    UNET_PREFIXES,
    VAE_PREFIXES,
    ConversionError,
    unet_from_nemo,
    unet_to_nemo,
    vae_from_nemo,
    vae_to_nemo,
)
from .output import atomic_output, write_nemo_tar
from .read import check_nemo_family, load_denoiser
from .to_diffusers import load_merged_unet

# the prefixes MegatronLatentDiffusion gives its modules (ddpm.py:1700 self.model = LatentDiffusion;
# 138 .model = DiffusionWrapper, 2366 .diffusion_model; 617 .first_stage_model; 633 .cond_stage_model)
NEMO_UNET_PREFIX = UNET_PREFIXES[0]
NEMO_VAE_PREFIX = VAE_PREFIXES[0]
NEMO_TEXT_PREFIX = "model.cond_stage_model.transformer."
NEMO_SCHEDULE_PREFIX = "model."
EXPORT_LAYOUTS = ("nemo", "ldm", "nemo_hf")
NEMO_VERSION = "2.1.0"  # the release whose layout this follows

_MM = "nemo.collections.multimodal"
SD_TARGET = f"{_MM}.models.text_to_image.stable_diffusion.ldm.ddpm.MegatronLatentDiffusion"
SDXL_TARGET = f"{_MM}.models.text_to_image.stable_diffusion.diffusion_engine.MegatronDiffusionEngine"
UNET_TARGET = f"{_MM}.modules.stable_diffusion.diffusionmodules.openaimodel.UNetModel"
VAE_TARGET = f"{_MM}.models.text_to_image.stable_diffusion.ldm.autoencoder.AutoencoderKL"
VAE_SDXL_TARGET = f"{_MM}.models.text_to_image.stable_diffusion.ldm.autoencoder.AutoencoderKLInferenceWrapper"
CLIP_TARGET = f"{_MM}.modules.stable_diffusion.encoders.modules.FrozenCLIPEmbedder"

# Keys of model_config.yaml that NeMo v2.1.0's constructors read as attributes (cfg.X), with the line:
# nemo/collections/multimodal/models/text_to_image/stable_diffusion/ldm/ddpm.py (DDPM.__init__ 127-158,
# LatentDiffusion.__init__ 528-560) and nemo/collections/nlp/models/language_modeling/megatron_base_model.py
# (MegatronBaseModel: cfg.precision 125, cfg.optim.get('name') 148).
SD_KEYS = (
    "target", "nemo_version", "precision", "optim",
    "parameterization", "clip_denoised", "log_every_t", "first_stage_key", "image_size", "channels",  # 127-135
    "use_positional_encodings", "unet_config", "conditioning_key", "inductor", "inductor_cudagraphs",  # 137-138
    "v_posterior", "original_elbo_weight", "l_simple_weight",  # 142-144
    "given_betas", "beta_schedule", "timesteps", "linear_start", "linear_end", "cosine_s",  # 147-152
    "loss_type", "learn_logvar", "logvar_init",  # 155-158
    "num_timesteps_cond", "scale_by_std", "concat_mode", "cond_stage_config", "ckpt_path", "ignore_keys",  # 528-539
    "cond_stage_trainable", "cond_stage_key", "first_stage_config", "scale_factor",  # 542-551
    "cond_stage_forward", "text_embedding_dropout_rate", "fused_opt",  # 556-560
)
# nemo/collections/multimodal/models/text_to_image/stable_diffusion/diffusion_engine.py DiffusionEngine.__init__
# 81-84 (unet_config, denoiser_config, first_stage_config, conditioner_config), 129-130 (scale_factor,
# disable_first_stage_autocast); MegatronDiffusionEngine: precision, optim, micro_batch_size (440), seed (603).
SDXL_KEYS = ("target", "nemo_version", "precision", "optim", "unet_config", "denoiser_config", "first_stage_config",
             "conditioner_config", "scale_factor", "disable_first_stage_autocast", "micro_batch_size", "seed")


def _unet_and_vae(source: str, base: Optional[str]):
    """(merged UNet, VAE, base dir) of a training output or a diffusers pipeline directory."""
    from diffusers import AutoencoderKL

    from ..backends.base import load_vae

    if os.path.isfile(os.path.join(source, "model_index.json")):
        check_nemo_family(source)
        unet, base = load_denoiser(source), source
    else:
        unet, base = load_merged_unet(source, base)
        check_nemo_family(base)
    vae = load_vae(base)
    if not isinstance(vae, AutoencoderKL):
        raise ValueError(f"{os.path.join(base, 'vae')}: the NeMo/LDM checkpoint layout holds an AutoencoderKL VAE, "
                         f"this pipeline's VAE is {type(vae).__name__}; export its UNet as a diffusers pipeline "
                         f"or LoRA instead")
    return unet, vae, base


def _plain_config(config) -> dict:
    # diffusers configs hold tuples (and FrozenDicts); the YAML must hold plain lists and dicts
    return json.loads(json.dumps(dict(config), default=list))


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------- configs
def _per_level(value, n: int, what: str) -> List:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ConversionError(f"UNet {what} has {len(values)} entries for {n} blocks")
    return values


def nemo_unet_config(cfg) -> dict:
    """``unet_config`` for NeMo's ``UNetModel`` (openaimodel.py:569-609 argument names) from a diffusers
    ``UNet2DConditionModel`` config."""
    boc = list(cfg["block_out_channels"])
    mc = boc[0]
    if any(c % mc for c in boc):
        raise ConversionError(f"block_out_channels {boc} are not multiples of the first: no NeMo channel_mult")
    n = len(boc)
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    attn = ["CrossAttn" in t for t in down]
    if attn != ["CrossAttn" in t for t in reversed(up)]:
        raise ConversionError(f"down blocks {down} and up blocks {up} are not mirrored: NeMo's UNetModel places "
                              f"attention by resolution on both paths")
    # UNetModel adds attention where the downsampling factor ds (1, 2, 4, ...) is in attention_resolutions
    resolutions = [2 ** level for level in range(n) if attn[level]]
    heads = _per_level(cfg.get("num_attention_heads") or cfg["attention_head_dim"], n, "attention heads")
    used = [level for level in range(n) if attn[level]]
    head_counts = {int(heads[level]) for level in used}
    head_dims = {boc[level] // int(heads[level]) for level in used}
    if len(head_counts) <= 1:
        num_heads, num_head_channels = (head_counts.pop() if head_counts else 8), -1
    elif len(head_dims) == 1:
        num_heads, num_head_channels = -1, head_dims.pop()
    else:
        raise ConversionError(f"attention heads {heads} per block have neither one count nor one width: NeMo's "
                              f"UNetModel takes one num_heads or one num_head_channels")
    lpb = _per_level(cfg["layers_per_block"], n, "layers_per_block")
    depth = _per_level(cfg.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
    out = {
        "_target_": UNET_TARGET,
        "from_pretrained": None,
        "from_NeMo": True,
        "image_size": int(cfg.get("sample_size") or 64),
        "in_channels": int(cfg["in_channels"]),
        "out_channels": int(cfg["out_channels"]),
        "model_channels": mc,
        "attention_resolutions": resolutions,
        "num_res_blocks": lpb[0] if len(set(lpb)) == 1 else lpb,
        "channel_mult": [c // mc for c in boc],
        "num_heads": num_heads,
        "num_head_channels": num_head_channels,
        "use_spatial_transformer": True,
        "transformer_depth": depth[0] if len(set(depth)) == 1 else depth,
        "context_dim": int(cfg["cross_attention_dim"]),
        "use_linear_in_transformer": bool(cfg.get("use_linear_projection", False)),
        "use_scale_shift_norm": cfg.get("resnet_time_scale_shift", "default") == "scale_shift",
        "resblock_gn_groups": int(cfg.get("norm_num_groups") or 32),
        "use_checkpoint": False,
        "legacy": False,
        "use_flash_attention": False,
        "unet_precision": "fp32",
    }
    if cfg.get("addition_embed_type") == "text_time":  # SDXL: label_emb = Sequential(Sequential(linear, SiLU, linear))
        out["num_classes"] = "sequential"
        out["adm_in_channels"] = int(cfg["projection_class_embeddings_input_dim"])
    elif cfg.get("addition_embed_type") or cfg.get("class_embed_type"):
        raise ConversionError(f"UNet conditioning addition_embed_type={cfg.get('addition_embed_type')!r} / "
                              f"class_embed_type={cfg.get('class_embed_type')!r} has no NeMo UNetModel equivalent")
    return out


def nemo_vae_config(cfg, sdxl: bool = False) -> dict:
    """``first_stage_config`` for NeMo's ``AutoencoderKL`` (ldm/autoencoder.py:311-323) and its
    ``ddconfig`` (the Encoder/Decoder arguments, diffusionmodules/model.py) from a diffusers VAE config."""
    boc = list(cfg["block_out_channels"])
    ch = boc[0]
    if any(c % ch for c in boc):
        raise ConversionError(f"VAE block_out_channels {boc} are not multiples of the first: no NeMo ch_mult")
    ddconfig = {"double_z": True, "z_channels": int(cfg["latent_channels"]),
                "resolution": int(cfg.get("sample_size") or 256),
                "in_channels": int(cfg["in_channels"]), "out_ch": int(cfg["out_channels"]), "ch": ch,
                "ch_mult": [c // ch for c in boc], "num_res_blocks": int(cfg["layers_per_block"]),
                "attn_resolutions": [], "dropout": 0.0}
    if sdxl:
        ddconfig = {"attn_type": "vanilla", **ddconfig}
    return {"_target_": VAE_SDXL_TARGET if sdxl else VAE_TARGET, "from_pretrained": None,
            "embed_dim": int(cfg["latent_channels"]), "monitor": "val/rec_loss", "ddconfig": ddconfig,
            "lossconfig": {"target": "torch.nn.Identity"}}


# diffusers beta_schedule → NeMo's make_beta_schedule name (diffusionmodules/util.py:45-63): NeMo "linear"
# is linspace(√start, √end)², diffusers "scaled_linear"; NeMo "sqrt_linear" is diffusers "linear".
_BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear", "squaredcos_cap_v2": "cosine"}
_PARAMETERIZATION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def _schedule(scheduler: dict) -> dict:
    name = scheduler.get("beta_schedule", "linear")
    if scheduler.get("trained_betas") is not None or name not in _BETA_SCHEDULES:
        raise ConversionError(f"scheduler beta_schedule {name!r} (trained_betas: "
                              f"{scheduler.get('trained_betas') is not None}) has no NeMo make_beta_schedule "
                              f"equivalent")
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in _PARAMETERIZATION:
        raise ConversionError(f"scheduler prediction_type {prediction!r} has no NeMo parameterization")
    return {"beta_schedule": _BETA_SCHEDULES[name], "timesteps": int(scheduler.get("num_train_timesteps", 1000)),
            "linear_start": float(scheduler.get("beta_start", 0.0001)),
            "linear_end": float(scheduler.get("beta_end", 0.02)), "cosine_s": 8e-3,
            "parameterization": _PARAMETERIZATION[prediction]}


def nemo_schedule_buffers(beta_schedule: str, timesteps: int, linear_start: float, linear_end: float,
                          cosine_s: float = 8e-3, v_posterior: float = 0.0) -> Dict[str, torch.Tensor]:
    """The persistent buffers of NeMo's ``DDPM.register_schedule`` (ddpm.py:171-222), computed the way
    it computes them (float64 numpy, then ``torch.tensor(..., dtype=float32)``), with
    ``make_beta_schedule`` (diffusionmodules/util.py:45-63)."""
    import numpy as np

    if beta_schedule == "linear":
        betas = (torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2).numpy()
    elif beta_schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64).numpy()
    elif beta_schedule == "cosine":
        t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + cosine_s
        alphas = torch.cos(t / (1 + cosine_s) * np.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        betas = np.clip((1 - alphas[1:] / alphas[:-1]).numpy(), a_min=0, a_max=0.999)
    else:
        raise ConversionError(f"beta_schedule {beta_schedule!r} is not one NeMo computes buffers for")
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = (1 - v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod) \
        + v_posterior * betas
    arrays = {
        "betas": betas, "alphas_cumprod": alphas_cumprod, "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in arrays.items()}


_OPTIM = {"name": "fused_adam", "lr": None, "weight_decay": 0.0, "betas": [0.9, 0.999]}


def sd_model_config(unet_cfg, vae_cfg, scheduler: dict, text_cfg: dict, clip_version: str) -> dict:
    """``model_config.yaml`` of a ``MegatronLatentDiffusion`` (values of NeMo's sd_train.yaml where the
    diffusers pipeline does not decide them)."""
    s = _schedule(scheduler)
    return {
        "target": SD_TARGET, "nemo_version": NEMO_VERSION, "precision": 32,
        "micro_batch_size": 1, "global_batch_size": 1, "seed": 1234,
        "linear_start": s["linear_start"], "linear_end": s["linear_end"], "num_timesteps_cond": 1,
        "log_every_t": 200, "timesteps": s["timesteps"], "first_stage_key": "images", "cond_stage_key": "captions",
        "image_size": int(unet_cfg.get("sample_size") or 64), "channels": int(unet_cfg["in_channels"]),
        "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
        "scale_factor": float(vae_cfg["scaling_factor"]), "use_ema": False, "scale_by_std": False,
        "ckpt_path": None, "ignore_keys": [], "parameterization": s["parameterization"], "clip_denoised": True,
        "load_only_unet": False, "cosine_s": s["cosine_s"], "given_betas": None, "original_elbo_weight": 0,
        "v_posterior": 0, "l_simple_weight": 1, "use_positional_encodings": False, "learn_logvar": False,
        "logvar_init": 0, "beta_schedule": s["beta_schedule"], "loss_type": "l2", "concat_mode": True,
        "cond_stage_forward": None, "text_embedding_dropout_rate": 0.0, "fused_opt": True, "inductor": False,
        "inductor_cudagraphs": False, "capture_cudagraph_iters": -1, "channels_last": True, "megatron_amp_O2": False,
        "unet_config": nemo_unet_config(unet_cfg),
        "first_stage_config": nemo_vae_config(vae_cfg),
        "cond_stage_config": {"_target_": CLIP_TARGET, "version": clip_version, "device": "cuda",
                              "max_length": int(text_cfg.get("max_position_embeddings", 77))},
        "optim": dict(_OPTIM),
    }


def sdxl_model_config(unet_cfg, vae_cfg, scheduler: dict) -> dict:
    """``model_config.yaml`` of a ``MegatronDiffusionEngine`` (the structure of NeMo's sd_xl_base.yaml;
    the conditioner names SDXL's two text encoders, whose weights NeMo loads by name)."""
    s = _schedule(scheduler)
    scaling = {"eps": "EpsScaling", "v": "VScaling"}.get(s["parameterization"])
    if scaling is None:
        raise ConversionError(f"SDXL parameterization {s['parameterization']!r} has no NeMo denoiser scaling")
    modules = f"{_MM}.modules.stable_diffusion"
    dm = f"{modules}.diffusionmodules"
    time_embedder = {"_target_": f"{modules}.encoders.modules.ConcatTimestepEmbedderND",
                     "outdim": int(unet_cfg.get("addition_time_embed_dim") or 256)}
    return {
        "target": SDXL_TARGET, "nemo_version": NEMO_VERSION, "precision": 32, "micro_batch_size": 1,
        "global_batch_size": 1, "seed": 1234,
        "scale_factor": float(vae_cfg["scaling_factor"]), "disable_first_stage_autocast": True, "is_legacy": False,
        "denoiser_config": {
            "_target_": f"{dm}.denoiser.DiscreteDenoiser", "num_idx": s["timesteps"],
            "weighting_config": {"_target_": f"{dm}.denoiser_weighting.EpsWeighting"},
            "scaling_config": {"_target_": f"{dm}.denoiser_scaling.{scaling}"},
            "discretization_config": {"_target_": f"{dm}.discretizer.LegacyDDPMDiscretization",
                                      "linear_start": s["linear_start"], "linear_end": s["linear_end"],
                                      "num_timesteps": s["timesteps"]},
        },
        "unet_config": nemo_unet_config(unet_cfg),
        "first_stage_config": nemo_vae_config(vae_cfg, sdxl=True),
        "conditioner_config": {
            "_target_": f"{modules}.encoders.modules.GeneralConditioner",
            "emb_models": [
                {"is_trainable": False, "input_key": "txt",
                 "emb_model": {"_target_": f"{modules}.encoders.modules.FrozenCLIPEmbedder", "layer": "hidden",
                               "layer_idx": 11}},
                {"is_trainable": False, "input_key": "txt",
                 "emb_model": {"_target_": f"{modules}.encoders.modules.FrozenOpenCLIPEmbedder2", "arch": "ViT-bigG-14",
                               "version": "laion2b_s39b_b160k", "freeze": True, "layer": "penultimate",
                               "always_return_pooled": True, "legacy": False}},
                *({"is_trainable": False, "input_key": key, "emb_model": dict(time_embedder)}
                  for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")),
            ],
        },
        "optim": dict(_OPTIM),
    }


# --------------------------------------------------------------------------- weights
def _check_complete(what: str, original: Dict[str, torch.Tensor], written: Dict[str, torch.Tensor], read_back) -> None:
    """Every tensor of ``original`` must be written once and come back from the written keys unchanged
    (``read_back``: the inverse key map)."""
    problems = []
    if len(written) != len(original):
        problems.append(f"{len(original)} tensors in, {len(written)} written")
    try:
        back = read_back(written)
    except ConversionError as e:
        back = None
        problems.append(str(e))
    if back is not None:
        lost = sorted(k for k in original if k not in back)
        changed = sorted(k for k in original if k in back and not torch.equal(original[k],
                                                                               back[k].reshape(original[k].shape)))
        problems += [some(keys, word) for keys, word in ((lost, "lost"), (changed, "changed")) if keys]
    if problems:
        raise ConversionError(f"{what} export is incomplete: " + "; ".join(problems))


def nemo_weights(unet, vae, layout: str = "nemo") -> Dict[str, torch.Tensor]:
    """UNet and VAE in the NeMo key layout (with their archive prefixes), checked complete."""
    if layout not in EXPORT_LAYOUTS:
        raise ValueError(f"layout must be one of {EXPORT_LAYOUTS}, got {layout!r}")
    unet_layout = "nemo_hf" if layout == "nemo" else layout
    vae_layout = "ldm" if layout == "nemo" else layout
    unet_state, vae_state = unet.state_dict(), vae.state_dict()
    nemo_unet = unet_to_nemo(unet_state, unet.config, unet_layout)
    nemo_vae = vae_to_nemo(vae_state, vae.config, vae_layout)
    _check_complete("UNet", unet_state, nemo_unet,
                    lambda w: unet_from_nemo(w, unet_state, unet.config, unet_layout))
    _check_complete("VAE", vae_state, nemo_vae, lambda w: vae_from_nemo(w, vae_state, vae.config))
    weights = {NEMO_UNET_PREFIX + k: v.contiguous() for k, v in nemo_unet.items()}
    weights.update({NEMO_VAE_PREFIX + k: v.contiguous() for k, v in nemo_vae.items()})
    if len(weights) != len(nemo_unet) + len(nemo_vae):
        raise ConversionError("UNet and VAE keys collide under their NeMo prefixes")
    return weights


def _text_encoder_state(base: str) -> Optional[Dict[str, torch.Tensor]]:
    """The base pipeline's CLIP text encoder state dict (FrozenCLIPEmbedder.transformer), or None when
    the pipeline has no ``text_encoder`` of class CLIPTextModel."""
    cfg = _read_json(os.path.join(base, "text_encoder", "config.json"))
    if "CLIPTextModel" not in (cfg.get("architectures") or []):
        return None
    from transformers import CLIPTextModel

    model = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", local_files_only=True)
    # NeMo v2.1 runs transformers 4.x, whose CLIPTextModel nests everything under ``text_model``
    # (transformers 5 flattened it): write the names NeMo's module has
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in model.state_dict().items()}


def export_nemo(source: str, out_file: str, base: Optional[str] = None, layout: str = "nemo",
                clip_version: str = "openai/clip-vit-large-patch14") -> str:
    """Training output or diffusers pipeline → NeMo Stable Diffusion ``.nemo`` (see the module docstring).
    ``clip_version``: the name NeMo's FrozenCLIPEmbedder builds its tokenizer and CLIPTextModel from
    (SD 1.x's text encoder; the weights written replace the downloaded ones)."""
    from ..backends import detect_family

    if layout not in EXPORT_LAYOUTS:
        raise ValueError(f"layout must be one of {EXPORT_LAYOUTS}, got {layout!r}")
    unet, vae, base = _unet_and_vae(source, base)
    family = detect_family(base)
    weights = nemo_weights(unet, vae, layout)
    scheduler = _read_json(os.path.join(base, "scheduler", "scheduler_config.json"))
    if family == "sdxl":
        config = sdxl_model_config(unet.config, vae.config, scheduler)
    else:
        text = _text_encoder_state(base) if layout == "nemo" else None
        text_cfg = _read_json(os.path.join(base, "text_encoder", "config.json"))
        config = sd_model_config(unet.config, vae.config, scheduler, text_cfg, clip_version)
        if layout == "nemo":
            s = _schedule(scheduler)
            extra = {NEMO_SCHEDULE_PREFIX + k: v for k, v in nemo_schedule_buffers(
                s["beta_schedule"], s["timesteps"], s["linear_start"], s["linear_end"], s["cosine_s"]).items()}
            if text is not None:
                extra.update({NEMO_TEXT_PREFIX + k: v.contiguous() for k, v in text.items()})
            clash = sorted(set(extra) & set(weights))
            if clash:
                raise ConversionError(f"keys written twice: {clash[:10]}")
            weights.update(extra)
    config["nemo_aligner_draft"] = {"layout": layout, "family": family,
                                    "unet_diffusers_config": _plain_config(unet.config),
                                    "vae_diffusers_config": _plain_config(vae.config)}
    with atomic_output(out_file, is_dir=False) as tmp:
        write_nemo_tar(tmp, config, weights)
    return out_file
