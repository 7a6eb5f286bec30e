"""A backend from the parts a NeMo-Aligner DRaFT+ command line names, with no diffusers pipeline directory.

NeMo-Aligner's ``train_sd_draftp.py`` / ``train_sdxl_draftp.py`` build the model from the ``model`` section
of ``draftp_sd.yaml`` / ``draftp_sdxl.yaml`` and load weights part by part:

* ``model.unet_config.from_pretrained`` + ``from_NeMo`` — the UNet. Its architecture comes from the same
  ``unet_config`` keys NeMo's ``UNetModel`` reads (:func:`diffusers_unet_config`). ``from_NeMo: True``: a
  NeMo/LDM checkpoint (``input_blocks.*``; read through :mod:`..export.ldm_layout`); ``False``: a diffusers
  (HF) UNet state dict (``down_blocks.*``). ``.safetensors``, or anything ``torch.load`` reads
  (``.ckpt``/``.bin``/``.pt``), unwrapped from a ``state_dict`` entry, prefixes stripped as NeMo does.
* ``model.first_stage_config.from_pretrained`` + ``from_NeMo`` — the VAE, architecture from
  ``first_stage_config.ddconfig`` and ``embed_dim``, latent scale ``model.scale_factor``.
* SD: ``model.cond_stage_config`` (``FrozenCLIPEmbedder``): ``version`` — here a local directory holding a
  Hugging Face ``CLIPTextModel`` (or a whole ``CLIPModel``) and its ``CLIPTokenizer`` — and ``max_length``.
* SDXL: ``model.conditioner_config.emb_models``: ``FrozenCLIPEmbedder`` (``layer: hidden`` at the
  penultimate ``layer_idx``), ``FrozenOpenCLIPEmbedder2`` (``layer: penultimate``,
  ``always_return_pooled: True``) whose ``version`` is a local path: either a Hugging Face
  ``CLIPTextModelWithProjection`` (or ``CLIPModel``) directory with its tokenizer, or an open_clip
  checkpoint file (e.g. ``open_clip_pytorch_model.bin`` of ``laion2b_s39b_b160k``; its text tower is
  converted, ``arch`` gives the head count, the tokenizer is open_clip's BPE), and three
  ``ConcatTimestepEmbedderND`` (original size, crop, target size; ``outdim`` per number).
* the noise schedule: SD from ``linear_start``, ``linear_end``, ``timesteps``, ``beta_schedule``,
  ``parameterization``; SDXL from ``denoiser_config`` (``LegacyDDPMDiscretization``, ``EpsScaling`` /
  ``VScaling``) and ``sampling.base`` (``discretization``, ``height``, ``width``).

Family rule: a section with ``conditioner_config``, or whose ``unet_config`` sets ``adm_in_channels``, is
SDXL (``SDXLBackend``, Euler); otherwise one with ``cond_stage_config`` is SD (``SDBackend``, DDIM).

Where this differs from NeMo (v2.1.0) / NeMo-Aligner, on purpose or by the shared backends:

* NeMo's loaders log missing/unexpected keys and go on (the tensors stay random); here any missing,
  unexpected or mis-shaped tensor is an error. A CompVis-named SDXL checkpoint loads completely here,
  while NeMo's ``from_NeMo: True`` loader renames CompVis transformer names of ``transformer_blocks.0`` only.
* NeMo's ``from_NeMo: False`` UNet mapping hard-codes ``num_res_blocks: 2``; any count works here.
* ``FrozenCLIPEmbedder`` / ``FrozenOpenCLIPEmbedder2`` pad their 77 hidden states with zeros to 80
  (a multiple of 8); the backends, like diffusers, give the UNet 77 (the three zero keys add
  ``exp(0)`` terms to NeMo's cross-attention softmax).
* NeMo-Aligner's SDXL passes ``[width, height]`` as original/target size; the SDXL backend uses
  diffusers' ``(height, width)`` — the same for square images.
* SDXL steps: diffusers' ``trailing`` spacing vs NeMo's floored one (:func:`sdxl_scheduler_config`).

Every problem is a ``ValueError`` / ``FileNotFoundError`` whose message starts with the dotted key that
chose the bad thing (``model.unet_config.from_pretrained: …``). Keys NeMo reads that have no effect on
the forward pass (``use_flash_attention``, ``unet_precision``, ``use_checkpoint``, ``lora_network_alpha``,
``_target_`` paths, …) are ignored, as are unrelated keys of the section.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .base import DiffusionBackend

UNET_KEY = "model.unet_config"
VAE_KEY = "model.first_stage_config"
COND_KEY = "model.cond_stage_config"
CONDITIONER_KEY = "model.conditioner_config"
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")  # diffusers' time-id order


# --------------------------------------------------------------------------- small helpers
def _plain(x):
    """A (possibly OmegaConf) config tree as plain dicts and lists."""
    if isinstance(x, Mapping) or (hasattr(x, "items") and hasattr(x, "keys")):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) or (hasattr(x, "__iter__") and hasattr(x, "__len__")
                                        and not isinstance(x, (str, bytes, torch.Tensor))):
        return [_plain(v) for v in x]
    return x


def _need(section: Mapping, name: str, key: str):
    if section.get(name) is None:
        raise ValueError(f"{key}.{name}: missing (NeMo reads it to build this part)")
    return section[name]


def _target_name(section: Mapping) -> str:
    return str(section.get("_target_") or section.get("target") or "").rsplit(".", 1)[-1]


def _check_target(section: Mapping, key: str, allowed: Sequence[str]) -> None:
    name = _target_name(section)
    if name and name not in allowed:
        raise ValueError(f"{key}._target_: {section.get('_target_')!r} is not supported here ({', '.join(allowed)})")


def _flag(section: Mapping, name: str, default: bool, key: str) -> bool:
    """``section[name]`` as a YAML / command-line boolean (``True``, ``false``, ``"False"``)."""
    value = section.get(name, default)
    if value is None:
        return default
    if isinstance(value, str):
        if value.strip().lower() in ("true", "1", "yes"):
            return True
        if value.strip().lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{key}.{name}: not a boolean: {value!r}")
    return bool(value)


def _per_level(value, n: int, key: str) -> List[int]:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{key}: expected an int or a list of {n} ints, got {value!r}")
    if isinstance(value, int):
        return [value] * n
    value = list(value)
    if len(value) != n or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{key}: expected an int or a list of {n} ints (one per channel_mult level), got {value}")
    return value


def _one_or_tuple(values: Sequence[int]):
    return values[0] if len(set(values)) == 1 else tuple(values)


# --------------------------------------------------------------------------- UNet
def diffusers_unet_config(unet_config: Mapping, *, sample_size: Optional[int] = None,
                          addition_time_embed_dim: int = 256, key: str = UNET_KEY) -> Dict[str, Any]:
    """The diffusers ``UNet2DConditionModel`` config of the UNet NeMo's ``UNetModel(**unet_config)`` builds
    (``openaimodel.py``, NeMo v2.1.0). NeMo-only keys that change nothing about the computation are
    ignored; a setting diffusers' UNet cannot express is a ValueError naming ``key.<setting>``.

    ``sample_size``: the latent size (diffusers' default resolution; NeMo keeps it outside ``unet_config``:
    ``model.image_size`` for SD). ``addition_time_embed_dim``: SDXL's size-embedding width per number
    (the ``ConcatTimestepEmbedderND`` ``outdim``; 256 in SDXL).
    """
    u = _plain(unet_config)
    model_channels = int(_need(u, "model_channels", key))
    mult = [int(m) for m in (u.get("channel_mult") or (1, 2, 4, 8))]
    n = len(mult)
    channels = [model_channels * m for m in mult]
    res_blocks = _per_level(_need(u, "num_res_blocks", key), n, f"{key}.num_res_blocks")
    att_res = {int(r) for r in _need(u, "attention_resolutions", key)}
    if not _flag(u, "use_spatial_transformer", False, key):
        raise ValueError(f"{key}.use_spatial_transformer: only UNets with spatial transformers (SD/SDXL: true) have "
                         f"a diffusers equivalent, got {u.get('use_spatial_transformer')!r}")
    context_dim = _need(u, "context_dim", key)
    if isinstance(context_dim, list):
        if len(set(context_dim)) != 1:
            raise ValueError(f"{key}.context_dim: per-block context dims {context_dim} have no diffusers equivalent")
        context_dim = context_dim[0]
    depth = _per_level(u.get("transformer_depth", 1), n, f"{key}.transformer_depth")
    middle = u.get("transformer_depth_middle")
    if middle is not None and int(middle) != depth[-1]:
        raise ValueError(f"{key}.transformer_depth_middle: {middle} differs from the last level's transformer_depth "
                         f"{depth[-1]}; diffusers' middle block uses the last level's depth")
    groups = int(u.get("resblock_gn_groups", 32))
    if groups != 32:
        raise ValueError(f"{key}.resblock_gn_groups: {groups}; NeMo's SpatialTransformer normalises with 32 groups "
                         f"whatever this says, diffusers uses one group count for both: only 32 fits")
    for name, default in (("dims", 2), ("conv_resample", True), ("use_scale_shift_norm", False),
                          ("resblock_updown", False), ("n_embed", None), ("disable_self_attentions", None),
                          ("num_attention_blocks", None), ("disable_middle_self_attn", False)):
        if name in u and u[name] != default and not (default is None and u[name] is None):
            raise ValueError(f"{key}.{name}: {u[name]!r} has no diffusers UNet2DConditionModel equivalent "
                             f"(supported: {default!r})")

    num_heads, head_channels = int(u.get("num_heads", -1)), int(u.get("num_head_channels", -1))
    if num_heads == -1 and head_channels == -1:
        raise ValueError(f"{key}: set num_heads or num_head_channels (NeMo's UNetModel asserts one of them)")
    legacy = _flag(u, "legacy", True, key)
    heads = []
    for level, ch in enumerate(channels):
        # openaimodel.py UNetModel.__init__: the per-level head count and width of each SpatialTransformer
        if head_channels == -1:
            h, d = num_heads, ch // num_heads
        else:
            h, d = ch // head_channels, head_channels
        if legacy:
            d = ch // h
        if h <= 0 or h * d != ch:
            raise ValueError(f"{key}: level {level} has {ch} channels, which {h} heads × {d} channels per head do "
                             f"not make up (num_heads={num_heads}, num_head_channels={head_channels}); diffusers "
                             f"needs heads × head width = channels")
        heads.append(h)

    attn = [2 ** level in att_res for level in range(n)]
    cfg: Dict[str, Any] = dict(
        sample_size=int(sample_size if sample_size is not None else u.get("image_size") or 64),
        in_channels=int(_need(u, "in_channels", key)),
        out_channels=int(_need(u, "out_channels", key)),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(channels),
        layers_per_block=_one_or_tuple(res_blocks),
        attention_head_dim=_one_or_tuple(heads),  # diffusers' name for the number of heads
        cross_attention_dim=int(context_dim),
        transformer_layers_per_block=_one_or_tuple(depth),
        use_linear_projection=_flag(u, "use_linear_in_transformer", False, key),
        norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
        flip_sin_to_cos=True, freq_shift=0,  # NeMo's timestep_embedding: [cos, sin], exp(-ln(1e4)·i/half)
        downsample_padding=1, mid_block_scale_factor=1, center_input_sample=False,
    )
    num_classes = u.get("num_classes")
    if num_classes == "sequential":
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=int(addition_time_embed_dim),
                   projection_class_embeddings_input_dim=int(_need(u, "adm_in_channels", key)))
    elif num_classes is not None:
        raise ValueError(f"{key}.num_classes: {num_classes!r} is not supported (null for SD, 'sequential' with "
                         f"adm_in_channels for SDXL)")
    return cfg


def _weights_path(section: Mapping, key: str, dir_files: Sequence[str] = ()) -> str:
    path = section.get("from_pretrained")
    if not path:
        raise ValueError(f"{key}.from_pretrained: not set; give the weights file (NeMo-Aligner: "
                         f"{key}.from_pretrained=/path/to/weights)")
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{key}.from_pretrained: {path!r} does not exist")
    if os.path.isdir(path):
        for name in dir_files:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        folder = f" or a folder with {' / '.join(dir_files)}" if dir_files else ""
        raise ValueError(f"{key}.from_pretrained: {path!r} is a directory; expected a weights file "
                         f"(.safetensors, .ckpt, .bin, .pt){folder}")
    return path


def read_weights(path: str, key: str) -> Dict[str, torch.Tensor]:
    """The tensors of a weights file as NeMo's loaders read it: safetensors by extension, else
    ``torch.load`` (here ``weights_only=True``, with the package's checkpoint allow-list), unwrapped from a
    ``state_dict`` entry (a Lightning checkpoint)."""
    from ..files import allow_checkpoint_globals, load_state_dict_file

    allow_checkpoint_globals()
    try:
        state = load_state_dict_file(path, key)
    except ValueError:
        raise
    except Exception as e:  # a truncated safetensors file, a foreign format
        raise ValueError(f"{key}: cannot read {path!r}: {type(e).__name__}: {e}") from None
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    if not tensors:
        raise ValueError(f"{key}: {path!r} holds no tensors")
    return tensors


def _find_probe(state: Mapping, prefixes: Sequence[str], probe: str) -> bool:
    return any(p + probe in state for p in prefixes)


def _check_from_nemo(key: str, path: str, from_nemo: bool, has_nemo: bool, has_hf: bool, what: str,
                     hf_names: str, nemo_names: str, default_note: str = "") -> None:
    """``from_NeMo`` must agree with the names the file holds (one line naming the flag to flip)."""
    if from_nemo and not has_nemo and has_hf:
        raise ValueError(f"{key}.from_pretrained: {path!r} holds a diffusers/HF {what} ({hf_names}) but "
                         f"{key}.from_NeMo is True; set {key}.from_NeMo=False")
    if not from_nemo and not has_hf and has_nemo:
        raise ValueError(f"{key}.from_pretrained: {path!r} holds a NeMo/LDM {what} ({nemo_names}) but "
                         f"{key}.from_NeMo is False{default_note}; set {key}.from_NeMo=True")


def load_nemo_unet(unet_config: Mapping, *, sample_size: Optional[int] = None, addition_time_embed_dim: int = 256,
                   key: str = UNET_KEY):
    """``UNet2DConditionModel`` of ``unet_config`` (:func:`diffusers_unet_config`) with the weights of
    ``unet_config.from_pretrained`` (NeMo layout if ``from_NeMo``, else diffusers'), in float32."""
    from diffusers import UNet2DConditionModel

    from ..export.ldm_layout import UNET_PREFIXES, ConversionError, gather, strip_prefix, unet_from_nemo

    u = _plain(unet_config)
    _check_target(u, key, ("UNetModel",))
    cfg = diffusers_unet_config(u, sample_size=sample_size, addition_time_embed_dim=addition_time_embed_dim, key=key)
    from_nemo = _flag(u, "from_NeMo", False, key)  # NeMo's UNetModel default
    path = _weights_path(u, key, () if from_nemo else ("diffusion_pytorch_model.safetensors",
                                                       "diffusion_pytorch_model.bin"))
    state = read_weights(path, f"{key}.from_pretrained")
    nemo_probe, hf_probe = "input_blocks.0.0.weight", "conv_in.weight"
    has_nemo, has_hf = _find_probe(state, UNET_PREFIXES, nemo_probe), _find_probe(state, UNET_PREFIXES, hf_probe)
    _check_from_nemo(key, path, from_nemo, has_nemo, has_hf, "UNet", "conv_in, down_blocks.*", "input_blocks.*")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    template = unet.state_dict()
    try:
        if from_nemo:
            weights = unet_from_nemo(strip_prefix(state, UNET_PREFIXES, nemo_probe), template, unet.config)
        else:
            weights = gather(strip_prefix(state, UNET_PREFIXES, hf_probe), {k: [k] for k in template}, template,
                             "HF/diffusers UNet")
    except ConversionError as e:
        raise ValueError(f"{key}.from_pretrained: {path!r} does not fit the UNet {key} describes "
                         f"(model_channels={u.get('model_channels')}, channel_mult={u.get('channel_mult')}, "
                         f"transformer_depth={u.get('transformer_depth', 1)}, context_dim={u.get('context_dim')}): "
                         f"{e}") from None
    _assign(unet, weights)
    return unet


def _assign(module: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Load a meta-device module's every tensor (float32, as diffusers' from_pretrained gives them)."""
    module.load_state_dict({k: v.to(torch.float32).contiguous() for k, v in weights.items()}, strict=True,
                           assign=True)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{type(module).__name__}: tensors not loaded: {left[:10]}")


# --------------------------------------------------------------------------- VAE
def diffusers_vae_config(first_stage_config: Mapping, *, scale_factor: float, force_upcast: bool = False,
                         key: str = VAE_KEY) -> Dict[str, Any]:
    """The diffusers ``AutoencoderKL`` config of NeMo's ``AutoencoderKL(ddconfig, embed_dim)``
    (``ldm/autoencoder.py``, ``diffusionmodules/model.py`` Encoder/Decoder: GroupNorm 32, eps 1e-6)."""
    f = _plain(first_stage_config)
    dd = _need(f, "ddconfig", key)
    dkey = f"{key}.ddconfig"
    if not _flag(dd, "double_z", True, dkey):
        raise ValueError(f"{dkey}.double_z: NeMo's AutoencoderKL asserts double_z: true")
    if list(dd.get("attn_resolutions") or []):
        raise ValueError(f"{dkey}.attn_resolutions: {dd['attn_resolutions']} — attention inside the VAE's down/up "
                         f"levels has no diffusers AutoencoderKL equivalent (SD/SDXL: [])")
    attn_type = dd.get("attn_type", "vanilla")
    if attn_type not in ("vanilla", "vanilla-xformers") or dd.get("use_linear_attn", False):
        raise ValueError(f"{dkey}.attn_type: {attn_type!r} is not supported (vanilla)")
    for name, default in (("resamp_with_conv", True), ("give_pre_end", False), ("tanh_out", False)):
        if dd.get(name, default) != default:
            raise ValueError(f"{dkey}.{name}: {dd[name]!r} is not supported ({default!r})")
    z = int(_need(dd, "z_channels", dkey))
    embed = int(_need(f, "embed_dim", key))
    if embed != z:
        raise ValueError(f"{key}.embed_dim: {embed} differs from ddconfig.z_channels {z}; diffusers' AutoencoderKL "
                         f"has one latent width")
    ch = int(_need(dd, "ch", dkey))
    mult = [int(m) for m in _need(dd, "ch_mult", dkey)]
    return dict(in_channels=int(dd.get("in_channels", 3)), out_channels=int(dd.get("out_ch", 3)),
                down_block_types=("DownEncoderBlock2D",) * len(mult), up_block_types=("UpDecoderBlock2D",) * len(mult),
                block_out_channels=tuple(ch * m for m in mult), layers_per_block=int(_need(dd, "num_res_blocks", dkey)),
                latent_channels=z, norm_num_groups=32, act_fn="silu", sample_size=int(dd.get("resolution", 512)),
                scaling_factor=float(scale_factor), force_upcast=bool(force_upcast))


def load_nemo_vae(first_stage_config: Mapping, *, scale_factor: float, force_upcast: bool = False,
                  key: str = VAE_KEY):
    """``AutoencoderKL`` of ``first_stage_config`` with the weights of its ``from_pretrained``: NeMo's
    names (``from_NeMo: True``; NeMo's loader strips no prefix, ours also accepts ``first_stage_model.``)
    or diffusers' (``False``; today's or the pre-0.14 attention names NeMo's mapping expects)."""
    from diffusers import AutoencoderKL

    from ..export.ldm_layout import (VAE_PREFIXES, ConversionError, gather, strip_prefix, vae_from_legacy_diffusers_names,
                                     vae_from_nemo)

    f = _plain(first_stage_config)
    _check_target(f, key, ("AutoencoderKL", "AutoencoderKLInferenceWrapper"))
    cfg = diffusers_vae_config(f, scale_factor=scale_factor, force_upcast=force_upcast, key=key)
    from_nemo = _flag(f, "from_NeMo", False, key)  # NeMo's AutoencoderKL default
    path = _weights_path(f, key, () if from_nemo else ("diffusion_pytorch_model.safetensors",
                                                       "diffusion_pytorch_model.bin"))
    state = read_weights(path, f"{key}.from_pretrained")
    nemo_probe, hf_probe = "decoder.conv_in.weight", "decoder.conv_norm_out.weight"
    _check_from_nemo(key, path, from_nemo, _find_probe(state, VAE_PREFIXES, "decoder.norm_out.weight"),
                     _find_probe(state, VAE_PREFIXES, hf_probe), "VAE", "conv_norm_out, up_blocks.*",
                     "decoder.up.*, norm_out", default_note=" (NeMo's default)")
    with torch.device("meta"):
        vae = AutoencoderKL(**cfg)
    template = vae.state_dict()
    try:
        if from_nemo:
            weights = vae_from_nemo(strip_prefix(state, VAE_PREFIXES, nemo_probe), template, vae.config)
        else:
            hf = vae_from_legacy_diffusers_names(strip_prefix(state, VAE_PREFIXES, nemo_probe))
            weights = gather(hf, {k: [k] for k in template}, template, "HF/diffusers VAE")
    except ConversionError as e:
        dd = f.get("ddconfig") or {}
        raise ValueError(f"{key}.from_pretrained: {path!r} does not fit the VAE {key}.ddconfig describes "
                         f"(ch={dd.get('ch')}, ch_mult={dd.get('ch_mult')}, num_res_blocks={dd.get('num_res_blocks')}): "
                         f"{e}") from None
    _assign(vae, weights)
    return vae


# --------------------------------------------------------------------------- text encoders
def _text_dir(path, key: str, what: str) -> str:
    if not path:
        raise ValueError(f"{key}: not set; give a local directory holding {what}")
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        cached = _hub_cache_snapshot(path)
        if cached is None:
            raise FileNotFoundError(f"{key}: {path!r} is neither a local directory nor a Hugging Face id in the local "
                                    f"cache (expected {what}; nothing is downloaded here)")
        path = cached
    if not os.path.isdir(path):
        raise ValueError(f"{key}: {path!r} is not a directory (expected a local directory holding {what})")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{key}: {path!r} has no config.json (expected {what}, saved with save_pretrained)")
    return path


def _hub_cache_snapshot(repo_id: str) -> Optional[str]:
    """NeMo's configs name text encoders by Hub id (``openai/clip-vit-large-patch14``). A model the user
    already has in the Hugging Face cache (``HF_HOME``) is used from there, offline; nothing is downloaded."""
    if repo_id.count("/") != 1 or os.path.isabs(repo_id):
        return None
    try:
        from huggingface_hub import snapshot_download

        # read the cache location now, not when huggingface_hub was imported
        cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
        return snapshot_download(repo_id, local_files_only=True, cache_dir=cache)
    except Exception:  # not cached (LocalEntryNotFoundError), or not a valid repo id
        return None


def _load_hf_text(path: str, key: str, model_cls, max_length: int, what: str):
    from transformers import CLIPTokenizer

    try:
        model, info = model_cls.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{key}: {path!r} does not hold {what}: {e}") from None
    if info.get("missing_keys"):
        raise ValueError(f"{key}: {path!r} lacks weights of a {model_cls.__name__}: {sorted(info['missing_keys'])[:10]}")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{key}: {path!r} has no CLIP tokenizer files (vocab.json, merges.txt): {e}") from None
    tokenizer.model_max_length = int(max_length)
    return model.to(torch.float32), tokenizer


def load_clip_embedder(emb_model: Mapping, key: str, *, penultimate: bool):
    """(``CLIPTextModel``, tokenizer) of a ``FrozenCLIPEmbedder`` section (``encoders/modules.py``: the
    HF model and tokenizer of ``version``, padded to ``max_length``). SD reads ``layer: last``
    (``last_hidden_state``); SDXL (``penultimate``) ``layer: hidden`` at ``layer_idx`` = the second-to-last
    entry of ``hidden_states`` (11 for CLIP ViT-L/14)."""
    from transformers import CLIPTextModel

    m = _plain(emb_model)
    _check_target(m, key, ("FrozenCLIPEmbedder",))
    path = _text_dir(m.get("version"), f"{key}.version", "a Hugging Face CLIPTextModel and its CLIPTokenizer")
    model, tok = _load_hf_text(path, f"{key}.version", CLIPTextModel, m.get("max_length", 77), "a CLIPTextModel")
    layer = m.get("layer", "last")
    if penultimate:
        n = int(model.config.num_hidden_layers)
        idx = m.get("layer_idx")
        if layer != "hidden" or idx is None or int(idx) % (n + 1) != n - 1:
            raise ValueError(f"{key}.layer: SDXL conditions on the penultimate hidden state: layer 'hidden' with "
                             f"layer_idx {n - 1} (or -2) for this {n}-layer encoder, got layer={layer!r}, "
                             f"layer_idx={idx!r}")
    elif layer != "last":
        raise ValueError(f"{key}.layer: SD conditions on the last hidden state (layer 'last'), got {layer!r}")
    return model, tok


def _open_clip_tokenizer(max_length: int):
    """open_clip.tokenize's tokens as a ``CLIPTokenizer``: CLIP's BPE, ``<|startoftext|>``/``<|endoftext|>``,
    padding with id 0 (``"!"``)."""
    from transformers import CLIPTokenizer

    from ..embedded.tokenizer import cached_clip_tokenizer_dir

    tok = CLIPTokenizer.from_pretrained(cached_clip_tokenizer_dir(), local_files_only=True)
    tok.pad_token = "!"
    tok.model_max_length = int(max_length)
    return tok


_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_RESBLOCK_NAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def open_clip_text_to_hf(state: Mapping[str, torch.Tensor], heads: int, quick_gelu: bool = False):
    """An open_clip CLIP checkpoint's text tower as a transformers ``CLIPTextModelWithProjection``.

    open_clip's text transformer (``open_clip/transformer.py`` ``TextTransformer``: pre-LN residual
    blocks with ``nn.MultiheadAttention``, causal mask, ``ln_final``, pooled at the end-of-text token
    (``argmax`` of the ids) and multiplied by ``text_projection``) is CLIP's, so every tensor has a place:
    ``in_proj_weight`` splits into q/k/v, ``text_projection`` ``[width, dim]`` is the transpose of HF's
    projection. ``heads`` is not in the tensors: it comes from the ``arch`` config."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    s = {k[len("text."):] if k.startswith("text.") else k: v for k, v in state.items()}
    need = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection")
    missing = [k for k in need if k not in s]
    if missing:
        raise ValueError(f"not an open_clip text checkpoint: no {missing}")
    vocab, width = s["token_embedding.weight"].shape
    layers = 1 + max((int(m[1]) for m in map(_RESBLOCK.match, s) if m), default=-1)
    if layers == 0 or width % heads:
        raise ValueError(f"open_clip checkpoint: {layers} text layers of width {width} with {heads} heads")
    cfg = CLIPTextConfig(vocab_size=int(vocab), hidden_size=int(width), num_hidden_layers=layers,
                         num_attention_heads=int(heads),
                         intermediate_size=int(s["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
                         max_position_embeddings=int(s["positional_embedding"].shape[0]),
                         projection_dim=int(s["text_projection"].shape[1]),
                         hidden_act="quick_gelu" if quick_gelu else "gelu",
                         layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    out = {"text_model.embeddings.token_embedding.weight": s["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": s["positional_embedding"],
           "text_model.final_layer_norm.weight": s["ln_final.weight"],
           "text_model.final_layer_norm.bias": s["ln_final.bias"],
           "text_projection.weight": s["text_projection"].t().contiguous()}
    for k, v in s.items():
        m = _RESBLOCK.match(k)
        if m is None:
            continue
        i, rest = m[1], m[2]
        base = f"text_model.encoder.layers.{i}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0), strict=True):
                out[f"{base}self_attn.{name}.{'weight' if rest.endswith('weight') else 'bias'}"] = part.contiguous()
            continue
        module, _, param = rest.rpartition(".")
        if module not in _RESBLOCK_NAMES:
            raise ValueError(f"open_clip checkpoint: unknown text tensor {k!r}")
        out[f"{base}{_RESBLOCK_NAMES[module]}.{param}"] = v
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(cfg)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(out)), sorted(set(out) - expected)
    if missing or unexpected:
        raise ValueError(f"open_clip checkpoint: missing {missing[:10]}, unexpected {unexpected[:10]}")
    # the one non-persistent buffer (position ids) is rebuilt on a real device before the check
    model.text_model.embeddings.register_buffer(
        "position_ids", torch.arange(cfg.max_position_embeddings).expand((1, -1)), persistent=False)
    _assign(model, out)
    return model.eval()


def load_open_clip_embedder2(emb_model: Mapping, key: str):
    """(``CLIPTextModelWithProjection``, tokenizer) of a ``FrozenOpenCLIPEmbedder2`` section
    (``encoders/modules.py``: ``layer: penultimate`` — the input of the last residual block, no final
    LayerNorm — and the pooled, projected end-of-text embedding, ``always_return_pooled: True``,
    ``legacy: False``). ``version``: a local HF directory, or an open_clip checkpoint file whose ``arch``
    (e.g. ``ViT-bigG-14``) names the open_clip model config."""
    from transformers import CLIPTextModelWithProjection

    m = _plain(emb_model)
    if m.get("layer", "last") != "penultimate":
        raise ValueError(f"{key}.layer: SDXL conditions on the penultimate layer of the open_clip encoder "
                         f"('penultimate'), got {m.get('layer', 'last')!r}")
    if not _flag(m, "always_return_pooled", False, key) or _flag(m, "legacy", True, key):
        raise ValueError(f"{key}.always_return_pooled: SDXL's pooled text embedding needs always_return_pooled: "
                         f"true and legacy: false, got {m.get('always_return_pooled', False)!r} / "
                         f"{m.get('legacy', True)!r}")
    vkey = f"{key}.version"
    what = ("a Hugging Face CLIPTextModelWithProjection (or CLIPModel) directory with its CLIPTokenizer, "
            "or an open_clip checkpoint file")
    path = m.get("version")
    if not path:
        raise ValueError(f"{vkey}: not set; give {what}")
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{vkey}: {path!r} does not exist (expected {what}; NeMo's open_clip pretrained "
                                f"tags are not downloaded here)")
    if os.path.isfile(path):
        import open_clip

        arch = m.get("arch") or "ViT-H-14"  # FrozenOpenCLIPEmbedder2's default
        try:
            arch_cfg = open_clip.get_model_config(arch)
        except Exception as e:  # an hf-hub: or local-dir: name that cannot be read here
            raise ValueError(f"{key}.arch: cannot read open_clip model config {arch!r}: {e}") from None
        if not arch_cfg:
            raise ValueError(f"{key}.arch: {arch!r} is not an open_clip model config (e.g. ViT-bigG-14)")
        text_cfg = arch_cfg.get("text_cfg", {})
        try:
            model = open_clip_text_to_hf(read_weights(path, vkey), int(text_cfg.get("heads", 8)),
                                         bool(arch_cfg.get("quick_gelu", False)))
        except ValueError as e:
            raise ValueError(f"{vkey}: {path!r}: {e}") from None
        return model, _open_clip_tokenizer(int(text_cfg.get("context_length", 77)))
    path = _text_dir(path, vkey, what)
    model, tok = _load_hf_text(path, vkey, CLIPTextModelWithProjection, 77, "a CLIPTextModelWithProjection")
    # open_clip.tokenize pads with id 0 ("!"); a tokenizer padding with <|endoftext|> would change the
    # hidden states at the padded positions, which the UNet attends to
    if tok.convert_tokens_to_ids("!") == 0:
        tok.pad_token = "!"
    return model, tok


# --------------------------------------------------------------------------- schedules
_PREDICTION = {"eps": "epsilon", "v": "v_prediction"}


def sd_scheduler_config(model: Mapping) -> Dict[str, Any]:
    """``DDIMScheduler`` config of NeMo's LatentDiffusion schedule and DDIM sampler.

    ``ldm/ddpm.py`` ``register_schedule`` → ``diffusionmodules/util.py`` ``make_beta_schedule``:
    ``linear`` is linear in √β (``linspace(√start, √end)²``: diffusers' ``scaled_linear``), ``sqrt_linear``
    is linear in β (diffusers' ``linear``), ``cosine`` (s = 0.008) is ``squaredcos_cap_v2``. NeMo's DDIM
    sampler (``make_ddim_timesteps`` "uniform" + 1, ``alphas_prev[0] = ᾱ_0``): ``leading`` spacing,
    ``steps_offset=1``, ``set_alpha_to_one=False``, no clipping."""
    m = _plain(model)
    param = _need(m, "parameterization", "model")
    if param not in _PREDICTION:
        raise ValueError(f"model.parameterization: {param!r} is not supported (eps or v)")
    schedule = _need(m, "beta_schedule", "model")
    cfg = dict(num_train_timesteps=int(_need(m, "timesteps", "model")),
               beta_start=float(_need(m, "linear_start", "model")), beta_end=float(_need(m, "linear_end", "model")),
               prediction_type=_PREDICTION[param], clip_sample=False, set_alpha_to_one=False, steps_offset=1,
               timestep_spacing="leading")
    if m.get("given_betas") is not None:
        betas = [float(b) for b in m["given_betas"]]
        if len(betas) != cfg["num_train_timesteps"]:
            raise ValueError(f"model.given_betas: {len(betas)} values for {cfg['num_train_timesteps']} timesteps")
        cfg.update(trained_betas=betas, beta_schedule="linear")
    elif schedule == "linear":
        cfg["beta_schedule"] = "scaled_linear"
    elif schedule == "sqrt_linear":
        cfg["beta_schedule"] = "linear"
    elif schedule == "cosine" and abs(float(m.get("cosine_s", 8e-3)) - 8e-3) < 1e-12:
        cfg["beta_schedule"] = "squaredcos_cap_v2"
    else:
        raise ValueError(f"model.beta_schedule: {schedule!r} is not supported (linear, sqrt_linear, cosine with "
                         f"cosine_s 8e-3)")
    return cfg


def sdxl_scheduler_config(model: Mapping) -> Dict[str, Any]:
    """``EulerDiscreteScheduler`` config of NeMo's SDXL denoiser and sampler.

    ``diffusionmodules/discretizer.py`` ``LegacyDDPMDiscretization`` (defaults 0.00085, 0.012, 1000):
    σ_t = √((1 − ᾱ_t)/ᾱ_t) of the ``make_beta_schedule("linear")`` (scaled-linear) schedule at the steps
    ``linspace(T − 1, 0, n, endpoint=False)`` rounded down — diffusers' ``trailing`` spacing (which
    rounds: the two differ by one timestep at some steps for some n). ``DiscreteDenoiser`` feeds the UNet
    the integer timestep, ``EpsScaling`` is ε-, ``VScaling`` v-prediction."""
    m = _plain(model)
    d = m.get("denoiser_config") or {}
    disc = d.get("discretization_config") or {}
    if disc and _target_name(disc) != "LegacyDDPMDiscretization":
        raise ValueError(f"model.denoiser_config.discretization_config: {_target_name(disc)!r} is not supported "
                         f"(LegacyDDPMDiscretization)")
    params = dict(disc.get("params") or {}, **{k: v for k, v in disc.items() if k not in ("_target_", "target", "params")})
    steps = int(params.get("num_timesteps", 1000))
    if d.get("num_idx") is not None and int(d["num_idx"]) != steps:
        raise ValueError(f"model.denoiser_config.num_idx: {d['num_idx']} differs from the discretization's {steps} "
                         f"timesteps")
    scaling = _target_name(d.get("scaling_config") or {}) or "EpsScaling"
    prediction = {"EpsScaling": "epsilon", "VScaling": "v_prediction"}.get(scaling)
    if prediction is None:
        raise ValueError(f"model.denoiser_config.scaling_config: {scaling!r} is not supported (EpsScaling, VScaling)")
    base = (m.get("sampling") or {}).get("base") or {}
    if base.get("discretization", "LegacyDDPMDiscretization") != "LegacyDDPMDiscretization":
        raise ValueError(f"model.sampling.base.discretization: {base['discretization']!r} is not supported "
                         f"(LegacyDDPMDiscretization)")
    return dict(num_train_timesteps=steps, beta_start=float(params.get("linear_start", 0.00085)),
                beta_end=float(params.get("linear_end", 0.012)), beta_schedule="scaled_linear",
                prediction_type=prediction, timestep_spacing="trailing", steps_offset=0,
                interpolation_type="linear", use_karras_sigmas=False)


# --------------------------------------------------------------------------- the backend
def nemo_family(model: Mapping) -> str:
    """``sdxl`` if the section has ``conditioner_config`` or its ``unet_config`` sets ``adm_in_channels``;
    else ``sd`` if it has ``cond_stage_config``; else a ValueError."""
    m = _plain(model)
    if m.get("conditioner_config") is not None or (m.get("unet_config") or {}).get("adm_in_channels") is not None:
        return "sdxl"
    if m.get("cond_stage_config") is not None:
        return "sd"
    raise ValueError("model: neither cond_stage_config (SD) nor conditioner_config (SDXL): cannot tell the model "
                     "family")


def _check_context(unet, width: int, what: str) -> None:
    if int(unet.config.cross_attention_dim) != width:
        raise ValueError(f"{UNET_KEY}.context_dim: {unet.config.cross_attention_dim} but {what} give {width} features")


def _sdxl_embedders(conditioner: Mapping) -> Tuple[Tuple[Mapping, str], Tuple[Mapping, str], int]:
    models = conditioner.get("emb_models")
    if not models:
        raise ValueError(f"{CONDITIONER_KEY}.emb_models: missing")
    clip = openclip = None
    sizes: List[Tuple[str, int]] = []
    for i, e in enumerate(models):
        key = f"{CONDITIONER_KEY}.emb_models[{i}].emb_model"
        m = (e or {}).get("emb_model") or {}
        name = _target_name(m)
        if name == "FrozenCLIPEmbedder":
            if clip is not None or openclip is not None:
                raise ValueError(f"{key}: expected one FrozenCLIPEmbedder before the FrozenOpenCLIPEmbedder2 "
                                 f"(their hidden states are concatenated in this order)")
            clip = (m, key)
        elif name == "FrozenOpenCLIPEmbedder2":
            if clip is None or openclip is not None:
                raise ValueError(f"{key}: expected the FrozenOpenCLIPEmbedder2 once, after the FrozenCLIPEmbedder")
            openclip = (m, key)
        elif name == "ConcatTimestepEmbedderND":
            sizes.append((str(e.get("input_key")), int(_need(m, "outdim", key))))
        else:
            raise ValueError(f"{key}._target_: {m.get('_target_')!r} is not supported (FrozenCLIPEmbedder, "
                             f"FrozenOpenCLIPEmbedder2, ConcatTimestepEmbedderND)")
    if clip is None or openclip is None:
        raise ValueError(f"{CONDITIONER_KEY}.emb_models: SDXL needs a FrozenCLIPEmbedder and a FrozenOpenCLIPEmbedder2")
    if [k for k, _ in sizes] != list(SIZE_KEYS) or len({d for _, d in sizes}) != 1:
        raise ValueError(f"{CONDITIONER_KEY}.emb_models: expected three ConcatTimestepEmbedderND with input_key "
                         f"{list(SIZE_KEYS)} in this order and one outdim, got {sizes}")
    return clip, openclip, sizes[0][1]


def load_nemo_parts_backend(model_section: Mapping, frozen_dtype: torch.dtype = torch.float32) -> DiffusionBackend:
    """An ``SDBackend`` or ``SDXLBackend`` (family: :func:`nemo_family`) from NeMo-Aligner's ``model``
    section (a plain dict, or an OmegaConf node); see the module docstring for the keys read."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    from .registry import get_family
    from .sd import SDBackend
    from .sdxl import NUM_TIME_IDS, SDXLBackend

    m = _plain(model_section)
    family = nemo_family(m)
    if _flag(m, "scale_by_std", False, "model"):
        raise ValueError("model.scale_by_std: true rescales latents by a statistic of the training data; give "
                         "model.scale_factor instead")
    scale = float(_need(m, "scale_factor", "model"))
    u = _plain(_need(m, "unet_config", "model"))
    vae_cfg = _need(m, "first_stage_config", "model")
    vae_down = 2 ** (len((vae_cfg.get("ddconfig") or {}).get("ch_mult") or [1, 2, 4, 4]) - 1)
    # every check that needs no file, before the (large) weights are read
    diffusers_vae_config(vae_cfg, scale_factor=scale)
    if family == "sd":
        if u.get("num_classes") is not None:
            raise ValueError(f"{UNET_KEY}.num_classes: {u['num_classes']!r}; an SD UNet (cond_stage_config) has none")
        diffusers_unet_config(u)
        scheduler = DDIMScheduler(**sd_scheduler_config(m))
        te, tok = load_clip_embedder(m["cond_stage_config"], COND_KEY, penultimate=False)
        unet = load_nemo_unet(u, sample_size=m.get("image_size") or u.get("image_size"))
        _check_context(unet, int(te.config.hidden_size), f"{COND_KEY}.version's hidden states")
        vae = load_nemo_vae(vae_cfg, scale_factor=scale)
        backend = SDBackend(unet, vae, [te], [tok], scheduler, frozen_dtype)
    else:
        conditioner = m.get("conditioner_config")
        if conditioner is None:
            raise ValueError(f"{CONDITIONER_KEY}: missing; an SDXL UNet (adm_in_channels) needs its two text "
                             f"encoders and size embedders")
        if u.get("num_classes") != "sequential" or u.get("adm_in_channels") is None:
            raise ValueError(f"{UNET_KEY}.num_classes: SDXL needs num_classes 'sequential' and adm_in_channels, got "
                             f"{u.get('num_classes')!r} / {u.get('adm_in_channels')!r}")
        (clip, clip_key), (openclip, openclip_key), time_dim = _sdxl_embedders(conditioner)
        diffusers_unet_config(u, addition_time_embed_dim=time_dim)
        scheduler = EulerDiscreteScheduler(**sdxl_scheduler_config(m))
        te1, tok1 = load_clip_embedder(clip, clip_key, penultimate=True)
        te2, tok2 = load_open_clip_embedder2(openclip, openclip_key)
        base = (m.get("sampling") or {}).get("base") or {}
        height, width = int(base.get("height", 512)), int(base.get("width", 512))  # NeMo-Aligner's defaults
        adm = int(te2.config.projection_dim) + NUM_TIME_IDS * time_dim
        if int(u["adm_in_channels"]) != adm:
            raise ValueError(f"{UNET_KEY}.adm_in_channels: {u['adm_in_channels']} but the pooled text embedding "
                             f"({te2.config.projection_dim}) and {NUM_TIME_IDS} size numbers × outdim {time_dim} "
                             f"make {adm}")
        unet = load_nemo_unet(u, sample_size=height // vae_down, addition_time_embed_dim=time_dim)
        _check_context(unet, int(te1.config.hidden_size) + int(te2.config.hidden_size),
                       f"{CONDITIONER_KEY}'s two text encoders")
        # disable_first_stage_autocast: NeMo decodes in fp32, diffusers' force_upcast
        upcast = _flag(m, "disable_first_stage_autocast", False, "model")
        vae = load_nemo_vae(vae_cfg, scale_factor=scale, force_upcast=upcast)
        backend = SDXLBackend(unet, vae, [te1, te2], [tok1, tok2], scheduler, frozen_dtype,
                              force_zeros_for_empty_prompt=True, resolution=(height, width))
    spec = get_family(family)
    backend.family_spec = spec
    backend.default_sampler = spec.default_sampler
    return backend
