"""Key maps between diffusers' UNet/VAE and NeMo's Stable Diffusion checkpoint layouts.

Two NeMo layouts exist for the same modules:

* ``"ldm"`` — NeMo's own UNet (``from_NeMo: True``), the CompVis/LDM openaimodel structure:
  ``input_blocks.N.M``, ``middle_block.{0,1,2}``, ``output_blocks.N.M``, ``time_embed.{0,2}``,
  ``out.{0,2}``; resnets ``in_layers.{0,2}``/``emb_layers.1``/``out_layers.{0,3}``/``skip_connection``;
  transformer blocks with diffusers' own names (``attn1``, ``norm1..3``, ``ff.net.0.proj``,
  ``ff.net.2``); VAE ``encoder.down.i.block.j``, ``mid.{block_1,attn_1,block_2}``, decoder ``up``
  in reverse order, and the VAE mid-attention q/k/v/proj_out stored as 1×1 convolutions
  ``[C, C, 1, 1]``. Prefixes in a full model: ``model.diffusion_model.`` / ``first_stage_model.``
  (NeMo's Megatron wrapper adds one more ``model.``).
* ``"nemo_hf"`` — what NeMo's HF→NeMo converter script writes (a bare state dict, no prefix):
  the same block numbering, but resnets ``in_layers.1``/``out_layers.2``, ``out.1``, and transformer
  blocks ``attn1.norm``/``attn2.norm``/``ff.net.0`` (the three norms), ``ff.net.1.proj``/``ff.net.3``;
  the VAE attention keeps linear ``[C, C]`` weights.

Each map is built from a diffusers model's own key list and config, so the same table drives both
directions and import∘export is the identity by construction. Tensors are never modified except for
the VAE attention's ``[C, C] ↔ [C, C, 1, 1]`` reshape.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Optional

import torch

LAYOUTS = ("ldm", "nemo_hf")
UNET_PREFIXES = ("model.model.diffusion_model.", "model.diffusion_model.", "diffusion_model.", "unet.", "")
VAE_PREFIXES = ("model.first_stage_model.", "first_stage_model.", "vae.", "")


class ConversionError(ValueError):
    """A checkpoint does not match the expected architecture/layout; the message lists what differs."""


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _resnet(rest: str, layout: str) -> str:
    conv1, conv2 = ("in_layers.2", "out_layers.3") if layout == "ldm" else ("in_layers.1", "out_layers.2")
    names = {"norm1": "in_layers.0", "conv1": conv1, "norm2": "out_layers.0", "conv2": conv2,
             "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
    head, _, tail = rest.partition(".")
    if head not in names:
        raise KeyError(rest)
    return f"{names[head]}.{tail}"


_TBLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.*)$")


def _attention(rest: str, layout: str) -> str:
    if layout == "ldm":
        return rest
    m = _TBLOCK.match(rest)
    if m is None:
        return rest  # norm, proj_in, proj_out keep their names
    t, sub = m.groups()
    for old, new in (("norm1.", "attn1.norm."), ("norm2.", "attn2.norm."), ("norm3.", "ff.net.0."),
                     ("ff.net.0.proj.", "ff.net.1.proj."), ("ff.net.2.", "ff.net.3.")):
        if sub.startswith(old):
            return f"transformer_blocks.{t}.{new}{sub[len(old):]}"
    return rest


def unet_key_map(keys: Iterable[str], config: Mapping, layout: str = "ldm") -> Dict[str, str]:
    """diffusers ``UNet2DConditionModel`` key → NeMo key (without prefix), for every key in ``keys``.

    ``config``: the UNet config (``layers_per_block``, ``up_block_types``). Raises ``ConversionError``
    listing keys this layout has no place for (an architecture the map does not cover).
    """
    _check_layout(layout)
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        if len(set(lpb)) != 1:
            raise ConversionError(f"per-block layers_per_block {list(lpb)} has no NeMo layout")
        lpb = lpb[0]
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0",
             "conv_out": "out.2" if layout == "ldm" else "out.1"}
    out: Dict[str, str] = {}
    unmapped: List[str] = []
    for key in keys:
        module, _, param = key.rpartition(".")
        try:
            if module in fixed:
                out[key] = f"{fixed[module]}.{param}"
                continue
            parts = key.split(".")
            if parts[0] == "down_blocks":
                b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
                base = 1 + b * (lpb + 1)
                if kind == "resnets":
                    out[key] = f"input_blocks.{base + j}.0.{_resnet(rest, layout)}"
                elif kind == "attentions":
                    out[key] = f"input_blocks.{base + j}.1.{_attention(rest, layout)}"
                elif kind == "downsamplers" and rest.startswith("conv."):
                    out[key] = f"input_blocks.{base + lpb}.0.op.{rest[5:]}"
                else:
                    raise KeyError(key)
            elif parts[0] == "mid_block":
                kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
                if kind == "resnets":
                    out[key] = f"middle_block.{2 * j}.{_resnet(rest, layout)}"
                elif kind == "attentions" and j == 0:
                    out[key] = f"middle_block.1.{_attention(rest, layout)}"
                else:
                    raise KeyError(key)
            elif parts[0] == "up_blocks":
                b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
                base = b * (lpb + 1)
                if kind == "resnets":
                    out[key] = f"output_blocks.{base + j}.0.{_resnet(rest, layout)}"
                elif kind == "attentions":
                    out[key] = f"output_blocks.{base + j}.1.{_attention(rest, layout)}"
                elif kind == "upsamplers" and rest.startswith("conv."):
                    slot = 2 if up_has_attn[b] else 1
                    out[key] = f"output_blocks.{base + lpb}.{slot}.conv.{rest[5:]}"
                else:
                    raise KeyError(key)
            else:
                raise KeyError(key)
        except (KeyError, ValueError, IndexError):
            unmapped.append(key)
    if unmapped:
        raise ConversionError(f"{len(unmapped)} UNet keys have no NeMo {layout!r} equivalent "
                              f"(unsupported architecture), e.g. {unmapped[:10]}")
    return out


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key_map(keys: Iterable[str], config: Mapping) -> Dict[str, str]:
    """diffusers ``AutoencoderKL`` key → LDM/NeMo VAE key (both NeMo layouts use the same names)."""
    n_up = len(config["up_block_types"])
    out: Dict[str, str] = {}
    unmapped: List[str] = []
    for key in keys:
        parts = key.split(".")
        try:
            if parts[0] in ("quant_conv", "post_quant_conv"):
                out[key] = key
                continue
            side, rest = parts[0], parts[1:]
            if side not in ("encoder", "decoder"):
                raise KeyError(key)
            name = ".".join(rest)
            if rest[0] in ("conv_in", "conv_out"):
                out[key] = key
            elif rest[0] == "conv_norm_out":
                out[key] = f"{side}.norm_out.{'.'.join(rest[1:])}"
            elif rest[0] in ("down_blocks", "up_blocks"):
                i = int(rest[1])
                stage = f"down.{i}" if rest[0] == "down_blocks" else f"up.{n_up - 1 - i}"
                if rest[2] == "resnets":
                    sub = ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
                    out[key] = f"{side}.{stage}.block.{rest[3]}.{sub}"
                elif rest[2] in ("downsamplers", "upsamplers") and rest[3] == "0":
                    kind = "downsample" if rest[2] == "downsamplers" else "upsample"
                    out[key] = f"{side}.{stage}.{kind}.{'.'.join(rest[4:])}"
                else:
                    raise KeyError(key)
            elif rest[0] == "mid_block":
                if rest[1] == "resnets":
                    out[key] = f"{side}.mid.block_{int(rest[2]) + 1}.{'.'.join(rest[3:])}"
                elif rest[1] == "attentions" and rest[2] == "0":
                    sub = ".".join(rest[3:])
                    for old, new in _VAE_ATTN.items():
                        if sub.startswith(old + "."):
                            out[key] = f"{side}.mid.attn_1.{new}.{sub[len(old) + 1:]}"
                            break
                    else:
                        raise KeyError(key)
                else:
                    raise KeyError(key)
            else:
                raise KeyError(name)
        except (KeyError, ValueError, IndexError):
            unmapped.append(key)
    if unmapped:
        raise ConversionError(f"{len(unmapped)} VAE keys have no NeMo equivalent, e.g. {unmapped[:10]}")
    return out


def strip_prefix(state: Mapping[str, torch.Tensor], prefixes, probe: str) -> Dict[str, torch.Tensor]:
    """The sub-dict under the first prefix in ``prefixes`` for which ``prefix + probe`` is a key."""
    for p in prefixes:
        if p + probe in state:
            return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
    sample = sorted(state)[:10]
    raise ConversionError(f"no key '<prefix>{probe}' with prefix in {list(prefixes)}: not a NeMo/LDM checkpoint of "
                          f"this model ({len(state)} keys, e.g. {sample})")


def detect_unet_layout(nemo_state: Mapping[str, torch.Tensor]) -> str:
    """``ldm`` or ``nemo_hf`` from the resnet conv indices (prefix already stripped)."""
    if "input_blocks.1.0.in_layers.2.weight" in nemo_state or "out.2.weight" in nemo_state:
        return "ldm"
    if "input_blocks.1.0.in_layers.1.weight" in nemo_state or "out.1.weight" in nemo_state:
        return "nemo_hf"
    raise ConversionError("cannot tell the UNet layout: neither 'input_blocks.1.0.in_layers.2.weight' (NeMo/LDM) "
                          "nor 'input_blocks.1.0.in_layers.1.weight' (NeMo HF-converter) is present")


def _describe(missing: List[str], unexpected: List[str], shapes: List[str], what: str) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys, e.g. {missing[:10]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:10]}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches, e.g. {shapes[:10]}")
    return f"{what} does not match the target architecture: " + "; ".join(parts)


def remap(source: Mapping[str, torch.Tensor], key_map: Mapping[str, str], template: Mapping[str, torch.Tensor],
          what: str, inverse: bool = False, allow_unexpected: bool = False) -> Dict[str, torch.Tensor]:
    """Rename ``source`` through ``key_map`` (diffusers → NeMo; ``inverse`` for NeMo → diffusers) and
    check every tensor against ``template`` (the target-side state dict: shapes).

    A shape that differs only by trailing singleton dims (conv 1×1 vs linear) is reshaped; anything
    else missing/unexpected/mismatched raises :class:`ConversionError` listing the first 10 of each.
    """
    mapping = {v: k for k, v in key_map.items()} if inverse else dict(key_map)
    if inverse and len(mapping) != len(key_map):
        raise ConversionError(f"{what}: the key map is not one-to-one")
    out: Dict[str, torch.Tensor] = {}
    unexpected = [k for k in source if k not in mapping]
    shapes = []
    for src_key, dst_key in mapping.items():
        if src_key not in source:
            continue
        t = source[src_key]
        want = tuple(template[dst_key].shape)
        if tuple(t.shape) != want:
            squeezed = tuple(s for s in t.shape if s != 1) == tuple(s for s in want if s != 1)
            if t.numel() == template[dst_key].numel() and squeezed and t.ndim in (2, 4) and len(want) in (2, 4):
                t = t.reshape(want)
            else:
                shapes.append(f"{src_key}: {tuple(t.shape)} vs expected {want}")
                continue
        out[dst_key] = t
    missing = sorted(k for k, v in mapping.items() if k not in source)
    if missing or shapes or (unexpected and not allow_unexpected):
        raise ConversionError(_describe(missing, [] if allow_unexpected else sorted(unexpected), shapes, what))
    return out


def unet_to_nemo(state: Mapping[str, torch.Tensor], config: Mapping, layout: str = "ldm") -> Dict[str, torch.Tensor]:
    """diffusers UNet state dict → NeMo layout (no prefix)."""
    key_map = unet_key_map(state.keys(), config, layout)
    template = {key_map[k]: v for k, v in state.items()}
    return remap(state, key_map, template, "diffusers UNet")


def unet_from_nemo(nemo_state: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor], config: Mapping,
                   layout: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """NeMo-layout UNet weights (prefix stripped) → diffusers keys, checked against ``template``
    (the target diffusers UNet's state dict)."""
    layout = layout or detect_unet_layout(nemo_state)
    key_map = unet_key_map(template.keys(), config, layout)
    return remap(nemo_state, key_map, template, f"NeMo UNet ({layout} layout)", inverse=True)


def vae_to_nemo(state: Mapping[str, torch.Tensor], config: Mapping, layout: str = "ldm") -> Dict[str, torch.Tensor]:
    """diffusers VAE state dict → NeMo layout; ``ldm`` stores the mid-attention as 1×1 convs."""
    _check_layout(layout)
    key_map = vae_key_map(state.keys(), config)
    template = {}
    for k, v in state.items():
        conv = layout == "ldm" and ".mid.attn_1." in key_map[k] and k.endswith(".weight") and v.ndim == 2
        template[key_map[k]] = v.reshape(*v.shape, 1, 1) if conv else v
    return remap(state, key_map, template, "diffusers VAE")


def vae_from_nemo(nemo_state: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor],
                  config: Mapping) -> Dict[str, torch.Tensor]:
    key_map = vae_key_map(template.keys(), config)
    return remap(nemo_state, key_map, template, "NeMo VAE", inverse=True)
