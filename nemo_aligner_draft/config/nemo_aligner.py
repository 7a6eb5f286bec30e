"""NeMo-Aligner's DRaFT+ config keys, as the typed config takes them.

NeMo-Aligner's ``examples/mm/stable_diffusion/conf/draftp_sd.yaml`` and ``draftp_sdxl.yaml`` (final commit
af2b3bd9 of github:NVIDIA/NeMo-Aligner) validate here unchanged. Each of their keys is one of:

* **honoured** — a field of the schema with NeMo-Aligner's meaning (``model.kl_coeff``,
  ``model.unet_config.from_pretrained``, ``exp_manager.ema.cpu_offload``, ...);
* **mapped** — an alias of one of our fields, with a converter where the values differ
  (``model.infer.sampler_type: DDIM`` → ``model.infer.sampler: ddim``; ``model.sampling.base.steps`` →
  ``model.infer.inference_steps``; ``model.data.webdataset.local_root_path`` → ``model.data.train.
  dataset_path``);
* **notice** — accepted with one notice line, because it means nothing here (``trainer.logger``,
  ``model.nsys_profile.*``, the LDM pretraining-loss options). A notice key that would change results
  if it had another value than NeMo-Aligner's default is declared with ``only=<default>``: any other
  value is an error, never silently ignored.

This module holds the NeMo-only sections (``unet_config``, ``first_stage_config``, ``cond_stage_config``,
``conditioner_config``, ``sampling``) and the notice tables; the schema's sections reference them. The
key table of docs/migrating_from_nemo_aligner.md is generated from these declarations
(:mod:`.keys`), so it cannot drift from the code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

from ..typed import Notice, Section, setting, skip

_NEMO_SD = "nemo.collections.multimodal"
UNET_TARGET = f"{_NEMO_SD}.modules.stable_diffusion.diffusionmodules.openaimodel.UNetModel"
VAE_TARGETS = (f"{_NEMO_SD}.models.text_to_image.stable_diffusion.ldm.autoencoder.AutoencoderKL",
               f"{_NEMO_SD}.models.text_to_image.stable_diffusion.ldm.autoencoder.AutoencoderKLInferenceWrapper")
CLIP_TARGET = f"{_NEMO_SD}.modules.stable_diffusion.encoders.modules.FrozenCLIPEmbedder"
CONDITIONER_TARGET = f"{_NEMO_SD}.modules.stable_diffusion.encoders.modules.GeneralConditioner"

PRETRAINING = "an LDM pretraining option (loss, conditioning dropout, logging); DRaFT+ fine-tuning does not use it"
INFERENCE_SCRIPT = "read by NeMo's sd_infer.py, not by DRaFT+ training"
PERFORMANCE = "a performance switch of NeMo's implementation; the math is the same here"


# --------------------------------------------------------------------------- value converters
def sampler_type(value):
    """NeMo-Aligner's ``model.infer.sampler_type`` → our ``model.infer.sampler``."""
    names = {"DDIM": "ddim"}
    if value not in names:
        raise ValueError(f"got {value!r}, expected DDIM (NeMo-Aligner's DRaFT+ samples SD with DDIM; "
                         f"PLMS and DPM are not supported here)")
    return names[value]


def sdxl_sampler(value):
    """``model.sampling.base.sampler`` → ``model.infer.sampler``: EulerEDMSampler is the Euler rule."""
    if value != "EulerEDMSampler":
        raise ValueError(f"got {value!r}, expected EulerEDMSampler (the Euler EDM sampler; other SDXL samplers "
                         f"are not supported here)")
    return "euler"


def dataset_paths(value):
    """NeMo's list of per-device paths (``[null]`` in the shipped files) → one path, or nothing."""
    if value is None:
        return skip()
    if isinstance(value, str):
        return value
    paths = [v for v in value if v is not None] if isinstance(value, (list, tuple)) else None
    if paths is None:
        raise ValueError(f"got {value!r}, expected a path or a list of paths")
    if not paths:
        return skip()
    if len(set(paths)) > 1:
        raise ValueError(f"got {len(set(paths))} different paths {paths[:3]}; NeMo-Aligner passes one prompt set "
                         f"(repeated per device): give one path")
    return paths[0]


def optional_path(value):
    return skip() if value is None else value


def rm_precision(value):
    """``rm.model.precision`` → ``rm.fp32``: a reward model kept in 32 bit runs in fp32."""
    return str(value) in ("32", "32-true", "fp32")


# --------------------------------------------------------------------------- NeMo-only sections
@dataclass
class UnetConfig(Section):
    """``model.unet_config``: NeMo's ``openaimodel.UNetModel`` arguments. When ``from_pretrained`` is set
    the UNet is built from these keys and loaded from that file (``from_NeMo``: NeMo's key layout, else
    HF/diffusers names); otherwise ``model.pretrained``'s UNet is used and these describe nothing."""

    notices = {
        "_target_": Notice("the UNet class is built from the keys below", only=UNET_TARGET),
        "use_flash_attention": Notice(PERFORMANCE),
    }

    from_pretrained: Optional[str] = setting(None, doc="a NeMo or HF UNet checkpoint file")
    from_NeMo: bool = setting(True, doc="True: NeMo's key layout; False: HF/diffusers key names")
    in_channels: int = setting(4, ge=1)
    out_channels: int = setting(4, ge=1)
    model_channels: int = setting(320, ge=1)
    attention_resolutions: List[int] = setting(default_factory=lambda: [4, 2, 1])
    num_res_blocks: int = setting(2, ge=1)
    channel_mult: List[int] = setting(default_factory=lambda: [1, 2, 4, 4])
    num_heads: int = setting(-1)
    num_head_channels: int = setting(-1)
    transformer_depth: Union[int, List[int]] = setting(1)
    context_dim: int = setting(768, ge=1)
    use_linear_in_transformer: bool = setting(False)
    adm_in_channels: Optional[int] = setting(None)
    num_classes: Optional[Union[int, str]] = setting(None)
    legacy: bool = setting(False)
    resblock_gn_groups: int = setting(32, ge=1)
    use_checkpoint: bool = setting(False, doc="activation checkpointing of the UNet blocks (model.activation_checkpointing)")
    use_spatial_transformer: bool = setting(True, doc="must be true: SD/SDXL UNets have spatial transformers")
    image_size: Optional[int] = setting(None, doc="the latent size (sample_size) when model.image_size is not set")


@dataclass
class DDConfig(Section):
    """``model.first_stage_config.ddconfig``: the KL autoencoder's encoder/decoder arguments."""

    notices = {
        "dropout": Notice("the VAE is frozen", only=0.0),
        "attn_type": Notice("the attention of the VAE's mid block", only="vanilla"),
    }

    double_z: bool = setting(True)
    z_channels: int = setting(4, ge=1)
    in_channels: int = setting(3, ge=1)
    out_ch: int = setting(3, ge=1)
    ch: int = setting(128, ge=1)
    ch_mult: List[int] = setting(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = setting(2, ge=1)
    attn_resolutions: List[int] = setting(default_factory=list)
    resolution: int = setting(256, ge=1, doc="the VAE config's sample_size (NeMo's autoencoder does not use it)")


@dataclass
class FirstStageConfig(Section):
    """``model.first_stage_config``: the VAE, built from ``ddconfig`` when ``from_pretrained`` is set."""

    notices = {
        "_target_": Notice("the VAE is built from ddconfig", only=VAE_TARGETS),
        "monitor": Notice(PRETRAINING),
        "lossconfig": Notice(PRETRAINING),
    }

    from_pretrained: Optional[str] = setting(None, doc="a NeMo or HF VAE checkpoint file")
    from_NeMo: bool = setting(True, doc="True: NeMo's key layout; False: HF/diffusers key names")
    embed_dim: int = setting(4, ge=1)
    ddconfig: DDConfig = setting(default_factory=DDConfig)


@dataclass
class CondStageConfig(Section):
    """``model.cond_stage_config`` (SD): the CLIP text encoder. ``version`` is a local Hugging Face
    ``CLIPTextModel`` directory with its tokenizer (NeMo downloads the hub id it names; nothing is
    downloaded here)."""

    notices = {
        "_target_": Notice("the CLIP text encoder", only=CLIP_TARGET),
        "device": Notice("the trainer places the encoder"),
    }

    version: Optional[str] = setting(None)
    max_length: int = setting(77, ge=1)


@dataclass
class ConditionerConfig(Section):
    """``model.conditioner_config`` (SDXL): NeMo's GeneralConditioner; ``emb_models`` lists the two text
    encoders (their ``version``: local directories here) and the size/crop embedders."""

    notices = {"_target_": Notice("SDXL's conditioner", only=CONDITIONER_TARGET)}

    emb_models: List[Dict[str, Any]] = setting(default_factory=list)


@dataclass
class SamplingBase(Section):
    """``model.sampling.base`` (SDXL): the sampler. steps/scale/width/height/sampler are aliases of
    ``model.infer``; the EDM Euler options that would change the samples are checked."""

    notices = {
        "guider": Notice("classifier-free guidance", only="VanillaCFG"),
        "thresholder": Notice("no thresholding", only="None"),
        "img2img_strength": Notice("text-to-image only", only=1.0),
        "sigma_min": Notice("an EDMDiscretization parameter; LegacyDDPMDiscretization takes σ from the DDPM schedule"),
        "sigma_max": Notice("an EDMDiscretization parameter; LegacyDDPMDiscretization takes σ from the DDPM schedule"),
        "rho": Notice("an EDMDiscretization parameter; LegacyDDPMDiscretization takes σ from the DDPM schedule"),
        "s_churn": Notice("the deterministic Euler rule (no churn)", only=0.0),
        "s_tmin": Notice("churn is off (s_churn 0)"),
        "s_tmax": Notice("churn is off (s_churn 0)"),
        "s_noise": Notice("churn is off (s_churn 0)", only=1.0),
        "eta": Notice("an ancestral sampler's parameter; EulerEDMSampler does not read it"),
        "order": Notice("a linear multistep sampler's parameter; EulerEDMSampler does not read it"),
        "aesthetic_score": Notice("the SDXL refiner's conditioning, not the base model's"),
        "negative_aesthetic_score": Notice("the SDXL refiner's conditioning, not the base model's"),
    }

    discretization: str = setting("LegacyDDPMDiscretization", choices=("LegacyDDPMDiscretization",),
                                  doc="SDXL's DDPM σ schedule, the one the Euler rule uses")
    orig_width: Optional[int] = setting(None, doc="SDXL's original-size conditioning (default: the target width)")
    orig_height: Optional[int] = setting(None, doc="SDXL's original-size conditioning (default: the target height)")
    crop_coords_top: int = setting(0, ge=0)
    crop_coords_left: int = setting(0, ge=0)


@dataclass
class SamplingConfig(Section):
    base: SamplingBase = setting(default_factory=SamplingBase)


# --------------------------------------------------------------------------- notices of shared sections
TRAINER_NOTICES = {
    "logger": Notice("exp_manager provides the loggers", only=False),
    "enable_checkpointing": Notice("exp_manager provides the checkpoint callback", only=False),
    "accumulate_grad_batches": Notice("accumulation follows model.global_batch_size", only=1),
    "max_epochs": Notice("trainer.draftp_sd.max_epochs caps the run, as in NeMo-Aligner"),
    "val_check_interval": Notice("trainer.draftp_sd.val_check_interval decides, as in NeMo-Aligner"),
    "replace_sampler_ddp": Notice("the prompt sampler is always the package's own", only=False),
}
EXP_MANAGER_NOTICES = {
    "create_checkpoint_callback": Notice("checkpoints are always written (trainer.draftp_sd.save_interval)", only=True),
}
CHECKPOINT_NOTICES = {
    "every_n_epochs": Notice("checkpoints follow steps (trainer.draftp_sd.save_interval)", only=0),
    "every_n_train_steps": Notice("trainer.draftp_sd.save_interval decides when checkpoints are written, as in "
                                  "NeMo-Aligner, whose loop saves on save_interval"),
}
MODEL_NOTICES = {
    # LDM construction and pretraining options: DRaFT+ fine-tunes a pretrained model and never computes
    # the diffusion training loss
    **{k: Notice(PRETRAINING) for k in (
        "num_timesteps_cond", "log_every_t", "first_stage_key", "cond_stage_key", "monitor", "clip_denoised",
        "original_elbo_weight", "v_posterior", "l_simple_weight", "learn_logvar", "logvar_init", "loss_type",
        "text_embedding_dropout_rate", "loss_fn_config", "ckpt_path", "ignore_keys", "cond_stage_forward")},
    "channels": Notice("the latent channels come from the UNet (in_channels)", only=4),
    "cond_stage_trainable": Notice("the text encoder stays frozen", only=False),
    "conditioning_key": Notice("cross-attention conditioning", only="crossattn"),
    "concat_mode": Notice("an LDM conditioning switch that cross-attention models ignore"),
    "use_ema": Notice("the LDM's own EMA of the UNet (exp_manager.ema is the fine-tuning EMA)", only=False),

    "load_only_unet": Notice("only the UNet is fine-tuned", only=False),
    "use_positional_encodings": Notice("the UNet's timestep embedding is the standard one", only=False),

    "is_legacy": Notice("SDXL's legacy conditioner switch", only=False),
    "fused_opt": Notice(PERFORMANCE),
    "inductor": Notice(PERFORMANCE, only=False),
    "inductor_cudagraphs": Notice(PERFORMANCE, only=False),
    "capture_cudagraph_iters": Notice(PERFORMANCE, only=-1),
    "channels_last": Notice(PERFORMANCE, only=False),
    "fsdp_set_buffer_dtype": Notice("FSDP is trainer.strategy=fsdp", only=None),
    "precache_mode": Notice("text embeddings are computed per batch", only=None),
    "apex_transformer_log_level": Notice("apex's logging level"),
    "nsys_profile": Notice("Nsight profiling ranges of NeMo's training loop"),
    "restore_from_path": Notice("NeMo-Aligner's DRaFT+ model does not read it (it loads the UNet from "
                                "model.unet_config.from_pretrained)", only=None),
}
INFER_NOTICES = {
    "num_images_per_prompt": Notice(INFERENCE_SCRIPT),
    "output_type": Notice(INFERENCE_SCRIPT),
    "save_to_file": Notice(INFERENCE_SCRIPT),
    "out_path": Notice(INFERENCE_SCRIPT),
    "seed": Notice(INFERENCE_SCRIPT),
    "prompts": Notice(INFERENCE_SCRIPT),
}
LORA_NOTICES = {
    "layer_selection": Notice("adapters go into every selected module, as NeMo's default does", only=None),
    "weight_tying": Notice("adapters are not tied", only=False),
    "position_embedding_strategy": Notice("an LLM adapter option", only=None),
}
RM_NOTICES = {
    "trainer": Notice("NeMo-Aligner builds a separate trainer for the reward model; here it runs in the "
                      "training process on the trainer's devices"),
}
DATA_NOTICES = {
    "webdataset": Notice("its local_root_path is an alias of model.data.train.dataset_path"),
}
ROOT_NOTICES = {
    # NeMo-Aligner's files carry these, but no NeMo-Aligner code reads them
    "reward_model": Notice("not read by NeMo-Aligner; the reward is rm.name / rm.model.restore_from_path"),
    "pretrained_checkpoint": Notice("not read by NeMo-Aligner"),
}
