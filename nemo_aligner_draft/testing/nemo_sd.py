"""Tiny random Stable Diffusion / SDXL parts in the on-disk layouts NeMo-Aligner users pass on the command
line (``model.unet_config.from_pretrained`` …), with the matching NeMo config sections.

What NeMo v2.1.0 reads, and so what the writers write:

* UNet, ``from_NeMo: True`` — ``diffusionmodules/openaimodel.py`` ``UNetModel.__init__`` (l. 955–971):
  ``safetensors`` by extension, else ``torch.load``; a ``state_dict`` entry is unwrapped (l. 963–964, a
  Lightning checkpoint); ``_strip_unet_key_prefix`` (l. 1292) strips ``model.diffusion_model.`` /
  ``model.model.diffusion_model.`` (and ``_orig_mod`` variants), other keys are used as they are;
  ``_load_pretrained_model`` (l. 1218) then applies ``_legacy_unet_ckpt_mapping`` (l. 1119, CompVis
  transformer names → NeMo's, ``transformer_blocks.0`` only) and the "GroupNormOpt" index shift (l. 1245:
  a missing ``….<i>.weight`` is taken from ``….<i+1>.weight``), and loads non-strictly: missing keys are a
  log line. :func:`write_nemo_unet` writes NeMo's own module names (``UNetModel.state_dict()``, the
  names :func:`nemo_unet_shapes` derives from the constructor, l. 686–952) under
  ``model.model.diffusion_model.`` inside ``{"state_dict": …}`` — a NeMo(-Aligner) Lightning checkpoint.
* UNet, ``from_NeMo: False`` — ``_state_key_mapping`` (l. 1183) renames diffusers' keys (it hard-codes
  three input blocks per level, i.e. ``num_res_blocks: 2``). :func:`write_hf_unet` writes diffusers'
  ``UNet2DConditionModel.state_dict()`` as diffusers saves it (``diffusion_pytorch_model.safetensors``).
* VAE, ``from_NeMo: True`` — ``models/text_to_image/stable_diffusion/ldm/autoencoder.py``
  ``AutoencoderKL.__init__`` (l. 341–357): ``torch.load``, ``state_dict`` unwrapped, **no prefix
  stripped**; keys are ``AutoencoderKL.state_dict()``'s (``encoder.down.i.block.j``, ``mid.attn_1.q`` as
  1×1 convs, ``quant_conv`` …: :func:`nemo_vae_shapes`, from ``diffusionmodules/model.py``).
* VAE, ``from_NeMo: False`` — ``_state_key_mapping`` (l. 359) expects diffusers' pre-0.14 mid-attention
  names (``query``/``key``/``value``/``proj_attn``, l. 376) as in SD 1.5's Hub ``vae`` file, and
  unsqueezes them to 1×1 convs (l. 445). :func:`write_hf_vae` writes those names.
* text encoders — ``modules/stable_diffusion/encoders/modules.py``: ``FrozenCLIPEmbedder`` loads
  ``CLIPTextModel`` / ``CLIPTokenizer`` ``from_pretrained(version)``; ``FrozenOpenCLIPEmbedder2`` an
  open_clip model (``arch``, ``version``). :func:`write_clip_text_dir` writes a local HF directory,
  :func:`write_open_clip_checkpoint` an open_clip CLIP checkpoint.

The tiny architectures respect NeMo's fixed 32-group GroupNorms (transformer and VAE norms ignore
``resblock_gn_groups``): every width is a multiple of 32. Each ``TINY_DIFFUSERS_*`` config is written out
by hand, independently of :func:`~..backends.nemo_parts.diffusers_unet_config`.
"""
from __future__ import annotations

import copy
import os
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from .tiny import TINY_TEXT, clip_tokenizer
from .tiny_sdxl import TEXT_1, TEXT_2, TIME_EMBED_DIM

UNET_TARGET = "nemo.collections.multimodal.modules.stable_diffusion.diffusionmodules.openaimodel.UNetModel"
VAE_TARGET = "nemo.collections.multimodal.models.text_to_image.stable_diffusion.ldm.autoencoder.AutoencoderKL"
_ENC = "nemo.collections.multimodal.modules.stable_diffusion.encoders.modules."

# ----------------------------------------------------------------------------------------------- SD
TINY_NEMO_UNET = dict(
    _target_=UNET_TARGET, from_pretrained=None, from_NeMo=True, image_size=32, in_channels=4, out_channels=4,
    model_channels=32, attention_resolutions=[1], num_res_blocks=1, channel_mult=[1, 2], num_heads=2,
    use_spatial_transformer=True, transformer_depth=1, context_dim=TINY_TEXT["hidden_size"], use_checkpoint=False,
    legacy=False, use_flash_attention=False, resblock_gn_groups=32, lora_network_alpha=None)
# the same UNet in diffusers' terms: attention at level 0 only (as SD 1.5 has none at its last level)
TINY_DIFFUSERS_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2, cross_attention_dim=TINY_TEXT["hidden_size"], norm_num_groups=32)

TINY_NEMO_VAE = dict(
    _target_=VAE_TARGET, from_pretrained=None, from_NeMo=True, embed_dim=4, monitor="val/rec_loss",
    ddconfig=dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 2, 2],
                  num_res_blocks=1, attn_resolutions=[], dropout=0.0),
    lossconfig=dict(target="torch.nn.Identity"))
TINY_DIFFUSERS_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=64)

# draftp_sd.yaml's schedule and scale
SD_SCHEDULE = dict(linear_start=0.00085, linear_end=0.012, timesteps=1000, beta_schedule="linear",
                   parameterization="eps", scale_factor=0.18215, image_size=8, channels=4, scale_by_std=False)

# ----------------------------------------------------------------------------------------------- SDXL
SDXL_ADM = TEXT_2["projection_dim"] + 6 * TIME_EMBED_DIM
TINY_NEMO_SDXL_UNET = dict(
    _target_=UNET_TARGET, from_NeMo=True, from_pretrained=None, adm_in_channels=SDXL_ADM, num_classes="sequential",
    use_checkpoint=False, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2],
    num_res_blocks=1, channel_mult=[1, 2], num_head_channels=16, use_spatial_transformer=True,
    use_linear_in_transformer=True, transformer_depth=[1, 2], context_dim=TEXT_1["hidden_size"] + TEXT_2["hidden_size"],
    image_size=64, legacy=False, use_flash_attention=True)
TINY_DIFFUSERS_SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
    cross_attention_dim=TEXT_1["hidden_size"] + TEXT_2["hidden_size"], norm_num_groups=32,
    addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=SDXL_ADM)


def _size_embedder(input_key: str) -> dict:
    return dict(is_trainable=False, ucg_rate=0.1, input_key=input_key,
                emb_model=dict(_target_=_ENC + "ConcatTimestepEmbedderND", outdim=TIME_EMBED_DIM))


def tiny_conditioner_config(clip_dir: str, open_clip_version: str, arch: str = "ViT-bigG-14") -> dict:
    """draftp_sdxl.yaml's ``conditioner_config`` for the tiny encoders (CLIP ``layer_idx`` 1: the
    penultimate hidden state of a 2-layer encoder, as 11 is for CLIP ViT-L/14's 12)."""
    return dict(_target_=_ENC + "GeneralConditioner", emb_models=[
        dict(is_trainable=False, input_key="captions", ucg_rate=0.1,
             emb_model=dict(_target_=_ENC + "FrozenCLIPEmbedder", layer="hidden", layer_idx=TEXT_1["num_hidden_layers"] - 1,
                            version=clip_dir)),
        dict(is_trainable=False, ucg_rate=0.1, input_key="captions",
             emb_model=dict(_target_=_ENC + "FrozenOpenCLIPEmbedder2", arch=arch, version=open_clip_version, freeze=True,
                            layer="penultimate", always_return_pooled=True, legacy=False)),
        _size_embedder("original_size_as_tuple"), _size_embedder("crop_coords_top_left"),
        _size_embedder("target_size_as_tuple")])


# draftp_sdxl.yaml's denoiser, sampling and scale
SDXL_REST = dict(
    scale_factor=0.13025, disable_first_stage_autocast=True, scale_by_std=False,
    sampling=dict(base=dict(sampler="EulerEDMSampler", width=64, height=64, steps=40,
                            discretization="LegacyDDPMDiscretization", guider="VanillaCFG", scale=5.0)),
    denoiser_config=dict(
        _target_="nemo.collections.multimodal.modules.stable_diffusion.diffusionmodules.denoiser.DiscreteDenoiser",
        num_idx=1000,
        weighting_config=dict(_target_="nemo.collections.multimodal.modules.stable_diffusion.diffusionmodules."
                                       "denoiser_weighting.EpsWeighting"),
        scaling_config=dict(_target_="nemo.collections.multimodal.modules.stable_diffusion.diffusionmodules."
                                    "denoiser_scaling.EpsScaling"),
        discretization_config=dict(_target_="nemo.collections.multimodal.modules.stable_diffusion.diffusionmodules."
                                            "discretizer.LegacyDDPMDiscretization")))


# ----------------------------------------------------------------------------------------------- NeMo's module tree
def _heads(ch: int, u: Mapping) -> Tuple[int, int]:
    """(heads, head width) of a SpatialTransformer on ``ch`` channels (openaimodel.py l. 760–768)."""
    num_heads, head_channels = u.get("num_heads", -1), u.get("num_head_channels", -1)
    if head_channels == -1:
        h, d = num_heads, ch // num_heads
    else:
        h, d = ch // head_channels, head_channels
    if u.get("legacy", True):
        d = ch // h
    return h, d


def _levels(value, n: int) -> List[int]:
    return [value] * n if isinstance(value, int) else list(value)


def nemo_unet_shapes(unet_config: Mapping) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of NeMo's ``UNetModel(**unet_config).state_dict()`` (openaimodel.py l. 686–952;
    ``ResBlock`` l. 277, ``SpatialTransformer`` / ``BasicTransformerBlock`` / ``CrossAttention`` /
    ``FeedForward`` in attention.py; fused GroupNorm+SiLU from ``util.normalization``), written from the
    constructor and nothing else."""
    u = dict(unet_config)
    mc, mult = u["model_channels"], list(u.get("channel_mult", (1, 2, 4, 8)))
    n = len(mult)
    res_blocks = _levels(u["num_res_blocks"], n)
    depth = _levels(u.get("transformer_depth", 1), n)
    depth_mid = u.get("transformer_depth_middle") or depth[-1]
    att = set(u["attention_resolutions"])
    ctx, linear, ted = u["context_dim"], u.get("use_linear_in_transformer", False), 4 * mc
    s: Dict[str, Tuple[int, ...]] = {}

    def lin(p, i, o, bias=True):
        s[p + ".weight"] = (o, i)
        if bias:
            s[p + ".bias"] = (o,)

    def conv(p, i, o, k):
        s[p + ".weight"], s[p + ".bias"] = (o, i, k, k), (o,)

    def norm(p, c):
        s[p + ".weight"], s[p + ".bias"] = (c,), (c,)

    def resblock(p, ch, out):
        norm(p + ".in_layers.0", ch)
        conv(p + ".in_layers.1", ch, out, 3)
        lin(p + ".emb_layers.1", ted, out)
        norm(p + ".out_layers.0", out)
        conv(p + ".out_layers.2", out, out, 3)
        if ch != out:
            conv(p + ".skip_connection", ch, out, 1)

    def transformer(p, ch, blocks):
        h, d = _heads(ch, u)
        inner = h * d
        norm(p + ".norm", ch)
        lin(p + ".proj_in", ch, inner) if linear else conv(p + ".proj_in", ch, inner, 1)
        for t in range(blocks):
            b = f"{p}.transformer_blocks.{t}"
            for a, kv in (("attn1", inner), ("attn2", ctx)):
                lin(f"{b}.{a}.to_q", inner, inner, bias=False)
                lin(f"{b}.{a}.to_k", kv, inner, bias=False)
                lin(f"{b}.{a}.to_v", kv, inner, bias=False)
                lin(f"{b}.{a}.to_out.0", inner, inner)
                norm(f"{b}.{a}.norm", inner)
            norm(f"{b}.ff.net.0", inner)
            lin(f"{b}.ff.net.1.proj", inner, inner * 4 * 2)  # GEGLU
            lin(f"{b}.ff.net.3", inner * 4, inner)
        # attention.py l. 572: the linear proj_out is nn.Linear(in_channels, inner_dim)
        lin(p + ".proj_out", ch, inner) if linear else conv(p + ".proj_out", inner, ch, 1)

    lin("time_embed.0", mc, ted)
    lin("time_embed.2", ted, ted)
    if u.get("num_classes") == "sequential":
        lin("label_emb.0.0", u["adm_in_channels"], ted)
        lin("label_emb.0.2", ted, ted)
    conv("input_blocks.0.0", u["in_channels"], mc, 3)
    chans, ch, ds, idx = [mc], mc, 1, 1
    for level, m in enumerate(mult):
        for _ in range(res_blocks[level]):
            resblock(f"input_blocks.{idx}.0", ch, m * mc)
            ch = m * mc
            if ds in att:
                transformer(f"input_blocks.{idx}.1", ch, depth[level])
            chans.append(ch)
            idx += 1
        if level != n - 1:
            conv(f"input_blocks.{idx}.0.op", ch, ch, 3)
            chans.append(ch)
            idx, ds = idx + 1, ds * 2
    resblock("middle_block.0", ch, ch)
    transformer("middle_block.1", ch, depth_mid)
    resblock("middle_block.2", ch, ch)
    idx = 0
    for level, m in reversed(list(enumerate(mult))):
        for i in range(res_blocks[level] + 1):
            resblock(f"output_blocks.{idx}.0", ch + chans.pop(), mc * m)
            ch, slot = mc * m, 1
            if ds in att:
                transformer(f"output_blocks.{idx}.1", ch, depth[level])
                slot = 2
            if level and i == res_blocks[level]:
                conv(f"output_blocks.{idx}.{slot}.conv", ch, ch, 3)
                ds //= 2
            idx += 1
    norm("out.0", ch)
    conv("out.1", mc, u["out_channels"], 3)
    return s


def nemo_vae_shapes(first_stage_config: Mapping) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of NeMo's ``AutoencoderKL(ddconfig, embed_dim).state_dict()`` (autoencoder.py
    l. 311–335; ``Encoder`` / ``Decoder`` / ``ResnetBlock`` / ``AttnBlock`` in diffusionmodules/model.py)."""
    dd, embed = first_stage_config["ddconfig"], first_stage_config["embed_dim"]
    ch, mult, nrb, z = dd["ch"], list(dd["ch_mult"]), dd["num_res_blocks"], dd["z_channels"]
    n = len(mult)
    s: Dict[str, Tuple[int, ...]] = {}

    def conv(p, i, o, k):
        s[p + ".weight"], s[p + ".bias"] = (o, i, k, k), (o,)

    def norm(p, c):
        s[p + ".weight"], s[p + ".bias"] = (c,), (c,)

    def resnet(p, i, o):
        norm(p + ".norm1", i)
        conv(p + ".conv1", i, o, 3)
        norm(p + ".norm2", o)
        conv(p + ".conv2", o, o, 3)
        if i != o:
            conv(p + ".nin_shortcut", i, o, 1)

    def mid(side, c):
        resnet(f"{side}.mid.block_1", c, c)
        norm(f"{side}.mid.attn_1.norm", c)
        for name in ("q", "k", "v", "proj_out"):
            conv(f"{side}.mid.attn_1.{name}", c, c, 1)
        resnet(f"{side}.mid.block_2", c, c)

    conv("encoder.conv_in", dd["in_channels"], ch, 3)
    in_mult = [1] + mult
    for i in range(n):
        block_in, block_out = ch * in_mult[i], ch * mult[i]
        for j in range(nrb):
            resnet(f"encoder.down.{i}.block.{j}", block_in, block_out)
            block_in = block_out
        if i != n - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    mid("encoder", block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", block_in, 2 * z, 3)
    block_in = ch * mult[-1]
    conv("decoder.conv_in", z, block_in, 3)
    mid("decoder", block_in)
    for i in reversed(range(n)):
        block_out = ch * mult[i]
        for j in range(nrb + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, block_out)
            block_in = block_out
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, dd["out_ch"], 3)
    conv("quant_conv", 2 * z, 2 * embed, 1)
    conv("post_quant_conv", embed, z, 1)
    return s


_LEGACY_TBLOCK0 = {f"transformer_blocks.0.{a}.{p}": f"transformer_blocks.0.{b}.{p}"
                   for a, b in (("norm1", "attn1.norm"), ("norm2", "attn2.norm"), ("norm3", "ff.net.0"),
                                ("ff.net.0.proj", "ff.net.1.proj"), ("ff.net.2", "ff.net.3"))
                   for p in ("weight", "bias")}


def simulate_nemo_unet_load(state: Mapping[str, torch.Tensor], unet_config: Mapping) -> Tuple[List[str], List[str]]:
    """(missing, unexpected) keys after NeMo v2.1.0's ``from_NeMo: True`` key handling, re-enacted:
    ``_strip_unet_key_prefix`` (openaimodel.py l. 1292), ``_legacy_unet_ckpt_mapping`` (l. 1119),
    the ``output_blocks.2.2.conv`` / ``out.1`` fixes and the GroupNormOpt index shift (l. 1232–1256).
    NeMo logs the missing keys and keeps those tensors at their random initialisation."""
    import re

    stripped = {}
    for k, v in state.items():
        for p in ("model.diffusion_model", "model.model.diffusion_model", "model._orig_mod.diffusion_model.",
                  "model.model._orig_mod.diffusion_model.", "model.model.diffusion_model._orig_mod."):
            if k.startswith(p):
                k = k.replace(p.rstrip(".") + ".", "")
                break
        stripped[k] = v
    pattern = re.compile(r"(input_blocks|output_blocks)\.[\d\w]+\.[\d\w]+\.")
    middle = re.compile(r"middle_block\.[\d\w]+\.")
    sd = {}
    for k, v in stripped.items():
        m, mm = pattern.match(k), middle.match(k)
        if m or mm:
            prefix = m.group(0) if m else mm.group(0)
            suffix = k.split(".", 3)[-1] if m else k.split(".", 2)[-1]
            k = prefix + _LEGACY_TBLOCK0[suffix] if suffix in _LEGACY_TBLOCK0 else k
        sd[k] = v
    expected = set(nemo_unet_shapes(unet_config))
    missing = sorted(expected - set(sd))
    if "output_blocks.2.2.conv.bias" in missing and "output_blocks.2.1.conv.bias" in sd:
        sd["output_blocks.2.2.conv.bias"] = sd["output_blocks.2.1.conv.bias"]
        sd["output_blocks.2.2.conv.weight"] = sd["output_blocks.2.1.conv.weight"]
    if "out.1.weight" in missing and "out.2.weight" in sd:
        sd["out.1.weight"], sd["out.1.bias"] = sd["out.2.weight"], sd["out.2.bias"]
    if "input_blocks.1.0.in_layers.2.weight" in sd and "input_blocks.1.0.in_layers.1.weight" in expected:
        for k in missing:
            s = k.split(".")
            try:
                sd[k] = sd[".".join(s[:-2] + [str(int(s[-2]) + 1)] + [s[-1]])]
            except (ValueError, KeyError):
                continue
    return sorted(expected - set(sd)), sorted(set(sd) - expected)


# ----------------------------------------------------------------------------------------------- writers
def _save(state: Mapping[str, torch.Tensor], path: str, state_dict_entry: bool) -> str:
    state = {k: v.detach().contiguous() for k, v in state.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save({"state_dict": state} if state_dict_entry else state, path)
    return path


def _check_shapes(got: Mapping[str, torch.Tensor], want: Mapping[str, Tuple[int, ...]], what: str) -> None:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    shapes = [k for k in want if k in got and tuple(got[k].shape) != want[k]]
    if missing or extra or shapes:
        raise AssertionError(f"{what} is not NeMo's layout: missing {missing[:10]}, extra {extra[:10]}, "
                             f"shapes {shapes[:10]}")


def write_nemo_unet(unet, path: str, unet_config: Mapping, *, layout: str = "nemo_hf",
                    prefix: str = "model.model.diffusion_model.", state_dict_entry: bool = True) -> str:
    """The diffusers ``unet``'s weights as a NeMo UNet checkpoint for ``from_NeMo: True``.

    ``nemo_hf``: NeMo's own ``UNetModel.state_dict()`` names, checked against :func:`nemo_unet_shapes`;
    ``ldm``/``compvis``: the CompVis-indexed spellings, checked by re-enacting NeMo's loader
    (:func:`simulate_nemo_unet_load`; ``compvis`` is expected to lose tensors there when a transformer
    stack has more than one block). Default: the key prefix and ``state_dict`` entry of a NeMo-Aligner
    Lightning checkpoint."""
    from ..export.ldm_layout import unet_to_nemo

    nemo = unet_to_nemo(unet.state_dict(), unet.config, layout)
    if layout == "nemo_hf":
        _check_shapes(nemo, nemo_unet_shapes(unet_config), "the UNet written")
    elif layout == "ldm":
        missing, unexpected = simulate_nemo_unet_load(nemo, unet_config)
        if missing:
            raise AssertionError(f"NeMo would not load {missing[:10]} from the ldm layout")
    return _save({prefix + k: v for k, v in nemo.items()}, path, state_dict_entry)


def write_hf_unet(unet, path: str) -> str:
    """diffusers' own UNet file (``from_NeMo: False``): ``UNet2DConditionModel.state_dict()`` as
    ``diffusion_pytorch_model.safetensors`` holds it (or ``torch.save``-d for ``.bin``/``.ckpt``)."""
    return _save(unet.state_dict(), path, state_dict_entry=False)


def write_nemo_vae(vae, path: str, first_stage_config: Mapping, *, state_dict_entry: bool = False) -> str:
    """The diffusers ``vae``'s weights as NeMo's ``AutoencoderKL.state_dict()`` (bare keys: NeMo's VAE
    loader strips no prefix), checked against :func:`nemo_vae_shapes`."""
    from ..export.ldm_layout import vae_to_nemo

    nemo = vae_to_nemo(vae.state_dict(), vae.config, "ldm")
    _check_shapes(nemo, nemo_vae_shapes(first_stage_config), "the VAE written")
    return _save(nemo, path, state_dict_entry)


def write_hf_vae(vae, path: str, *, legacy_attention_names: bool = True) -> str:
    """diffusers' VAE file (``from_NeMo: False``); with ``legacy_attention_names`` the mid-attention as SD
    1.5's Hub file and NeMo's HF mapping name it (``query``/``key``/``value``/``proj_attn``)."""
    import re

    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    pattern = re.compile(r"^((?:encoder|decoder)\.mid_block\.attentions\.0\.)(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$")
    state = {}
    for k, v in vae.state_dict().items():
        m = pattern.match(k) if legacy_attention_names else None
        state[f"{m[1]}{names[m[2]]}.{m[3]}" if m else k] = v
    return _save(state, path, state_dict_entry=False)


def write_clip_text_dir(path: str, config: Mapping = TINY_TEXT, *, seed: int = 0, with_projection: bool = False,
                        pad_token: Optional[str] = None):
    """A local HF text-encoder directory as ``FrozenCLIPEmbedder(version=path)`` loads it: a random
    ``CLIPTextModel`` (or ``CLIPTextModelWithProjection``) of ``config`` and the real CLIP tokenizer.
    Returns (model, tokenizer) as written."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(CLIPTextConfig(**config)).eval()
    tok = clip_tokenizer()
    if pad_token is not None:
        tok.pad_token = pad_token
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


TINY_OPEN_CLIP = dict(embed_dim=TEXT_2["projection_dim"],
                      text_cfg=dict(context_length=77, vocab_size=49408, width=TEXT_2["hidden_size"], heads=4, layers=2),
                      vision_cfg=dict(image_size=32, layers=1, width=32, head_width=16, patch_size=16))


def write_open_clip_checkpoint(path: str, model_cfg: Mapping = TINY_OPEN_CLIP, *, seed: int = 0):
    """An open_clip ``CLIP`` checkpoint (what ``open_clip.create_model_and_transforms(arch, pretrained=…)``
    loads: the whole model's ``state_dict``, text tower at top level). Returns the model."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**copy.deepcopy(dict(model_cfg))).eval()
    with torch.no_grad():  # open_clip initialises the projection and the MLP outputs small: make them matter
        for name, p in model.named_parameters():
            if not name.startswith("visual."):
                p.add_(torch.randn_like(p) * 0.02)
    _save(model.state_dict(), path, state_dict_entry=False)
    return model


# ----------------------------------------------------------------------------------------------- whole sections
def build_tiny_sd_modules(seed: int = 0) -> Dict[str, object]:
    """Random diffusers modules of the tiny SD architecture: unet, vae, text_encoder (unsaved), tokenizer."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_DIFFUSERS_UNET).eval()
    vae = AutoencoderKL(**TINY_DIFFUSERS_VAE, scaling_factor=SD_SCHEDULE["scale_factor"]).eval()
    _perturb(unet, vae)
    te = CLIPTextModel(CLIPTextConfig(**TINY_TEXT)).eval()
    return dict(unet=unet, vae=vae, text_encoder=te, tokenizer=clip_tokenizer())


def _perturb(*modules) -> None:
    """Every norm starts at weight 1, bias 0 (and some biases at 0): two such tensors swapped by a wrong
    key map would give the same outputs. Noise on every tensor makes each one count."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


def write_tiny_nemo_sd(modules: Mapping, directory: str, *, from_NeMo: bool = True, vae_from_NeMo: Optional[bool] = None,
                       unet_layout: str = "nemo_hf") -> dict:
    """Write ``modules`` (:func:`build_tiny_sd_modules`) into ``directory`` the way a NeMo-Aligner SD user
    has them, and return the matching ``model`` section (draftp_sd.yaml's keys)."""
    vae_nemo = from_NeMo if vae_from_NeMo is None else vae_from_NeMo
    os.makedirs(directory, exist_ok=True)
    unet_cfg = dict(TINY_NEMO_UNET, from_NeMo=from_NeMo)
    vae_cfg = copy.deepcopy(dict(TINY_NEMO_VAE, from_NeMo=vae_nemo))
    if from_NeMo:
        unet_cfg["from_pretrained"] = write_nemo_unet(modules["unet"], os.path.join(directory, "unet.ckpt"), unet_cfg,
                                                      layout=unet_layout)
    else:
        unet_cfg["from_pretrained"] = write_hf_unet(modules["unet"], os.path.join(directory, "unet.safetensors"))
    if vae_nemo:
        vae_cfg["from_pretrained"] = write_nemo_vae(modules["vae"], os.path.join(directory, "vae.ckpt"), vae_cfg)
    else:
        vae_cfg["from_pretrained"] = write_hf_vae(modules["vae"], os.path.join(directory, "vae.bin"))
    clip_dir = os.path.join(directory, "clip")
    modules["text_encoder"].save_pretrained(clip_dir)
    modules["tokenizer"].save_pretrained(clip_dir)
    cond = dict(_target_=_ENC + "FrozenCLIPEmbedder", version=clip_dir, device="cpu", max_length=77)
    return dict(SD_SCHEDULE, unet_config=unet_cfg, first_stage_config=vae_cfg, cond_stage_config=cond)


def build_tiny_sdxl_modules(seed: int = 0) -> Dict[str, object]:
    """Random diffusers modules of the tiny SDXL architecture (both text encoders; tokenizer_2 pads with
    ``"!"`` = id 0, as open_clip.tokenize and SDXL's tokenizer_2 do)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_DIFFUSERS_SDXL_UNET).eval()
    vae = AutoencoderKL(**TINY_DIFFUSERS_VAE, scaling_factor=SDXL_REST["scale_factor"], force_upcast=True).eval()
    _perturb(unet, vae)
    te1 = CLIPTextModel(CLIPTextConfig(**TEXT_1)).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2)).eval()
    tok2 = clip_tokenizer()
    tok2.pad_token = "!"
    return dict(unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=clip_tokenizer(), tokenizer_2=tok2)


def write_tiny_nemo_sdxl(modules: Mapping, directory: str, *, from_NeMo: bool = True,
                         open_clip_version: Optional[str] = None, unet_layout: str = "nemo_hf") -> dict:
    """Write ``modules`` (:func:`build_tiny_sdxl_modules`) into ``directory`` as an SDXL NeMo-Aligner user
    has them and return the matching ``model`` section (draftp_sdxl.yaml's keys). ``open_clip_version``:
    give a path to use an open_clip checkpoint instead of ``text_encoder_2``'s HF directory."""
    os.makedirs(directory, exist_ok=True)
    unet_cfg = dict(TINY_NEMO_SDXL_UNET, from_NeMo=from_NeMo)
    vae_cfg = copy.deepcopy(dict(TINY_NEMO_VAE, from_NeMo=from_NeMo))
    if from_NeMo:
        unet_cfg["from_pretrained"] = write_nemo_unet(modules["unet"], os.path.join(directory, "unet.ckpt"), unet_cfg,
                                                      layout=unet_layout)
        vae_cfg["from_pretrained"] = write_nemo_vae(modules["vae"], os.path.join(directory, "vae.ckpt"), vae_cfg)
    else:
        unet_cfg["from_pretrained"] = write_hf_unet(modules["unet"], os.path.join(directory, "unet.safetensors"))
        vae_cfg["from_pretrained"] = write_hf_vae(modules["vae"], os.path.join(directory, "vae.safetensors"),
                                                  legacy_attention_names=False)
    dirs = []
    for te, tok, name in ((modules["text_encoder"], modules["tokenizer"], "clip_l"),
                          (modules["text_encoder_2"], modules["tokenizer_2"], "clip_g")):
        d = os.path.join(directory, name)
        te.save_pretrained(d)
        tok.save_pretrained(d)
        dirs.append(d)
    return dict(SDXL_REST, unet_config=unet_cfg, first_stage_config=vae_cfg,
                conditioner_config=tiny_conditioner_config(dirs[0], open_clip_version or dirs[1]))


def nemo_state(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a written checkpoint (for tests that edit one)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def rewrite(path: str, state: Mapping[str, torch.Tensor], out: str) -> str:
    """``state`` written to ``out`` in ``path``'s container (``state_dict`` entry or not)."""
    entry = False
    if not path.endswith(".safetensors"):
        raw = torch.load(path, map_location="cpu", weights_only=True)
        entry = isinstance(raw, dict) and "state_dict" in raw
    return _save(dict(state), out, entry)
