"""Key maps between diffusers' UNet/VAE and NeMo's Stable Diffusion checkpoint layouts.

NeMo's UNet (``nemo/collections/multimodal/modules/stable_diffusion/diffusionmodules/openaimodel.py``,
NeMo v2.1.0, ``UNetModel``) numbers its blocks like CompVis' LDM: ``input_blocks.N.M``,
``middle_block.{0,1,2}``, ``output_blocks.N.M``, ``time_embed.{0,2}``, ``label_emb.0.{0,2}`` (SDXL's
``adm_in_channels``), ``out``. Three spellings of the tensors inside those blocks exist:

* ``"nemo_hf"`` — NeMo's own module names, i.e. ``UNetModel.state_dict()``: what NeMo saves and what its
  HF→NeMo converter (``examples/multimodal/text_to_image/convert_hf_ckpt_to_nemo.py``) writes. NeMo's
  GroupNorm fuses the SiLU (``diffusionmodules/util.py`` ``normalization``), so resnets are
  ``in_layers.{0,1}``, ``emb_layers.1``, ``out_layers.{0,2}``, the last conv ``out.1``; transformer
  blocks keep each norm inside the module it precedes (``attention.py``: ``CrossAttention.norm``,
  ``FeedForward.net = [LayerNorm, GEGLU, Dropout, Linear]``): ``attn1.norm``, ``attn2.norm``,
  ``ff.net.0``, ``ff.net.1.proj``, ``ff.net.3``.
* ``"compvis"`` — the original CompVis/Stability checkpoints (what diffusers' single-file loader reads):
  resnets ``in_layers.{0,2}``, ``out_layers.{0,3}``, ``out.{0,2}`` and transformer blocks ``norm1..3``,
  ``ff.net.0.proj``, ``ff.net.2``.
* ``"ldm"`` (these functions' default) — CompVis block numbering and resnet indices, transformer blocks in
  NeMo's names for *every* block. This is exactly what NeMo's ``from_NeMo: True`` loader
  (``UNetModel._load_pretrained_model``) reads without losing a tensor: its "GroupNormOpt" index shift
  maps ``in_layers.2``/``out_layers.3``/``out.2`` of every resnet onto its fused modules, but its
  ``_legacy_unet_ckpt_mapping`` renames CompVis transformer names only for ``transformer_blocks.0``, so a
  ``compvis`` SDXL checkpoint (``transformer_depth`` 2 and 10) loses the norms and feed-forwards of
  blocks ≥ 1 there, with a log line. ``ldm`` has no such name.

Reading accepts, per tensor, either transformer spelling (a Stability checkpoint, an export of this
package from before ``ldm`` used NeMo's names, a file with only block 0 renamed) with the resnet indices of the detected layout; a tensor present under
two names, a missing tensor, an unexpected one, or a shape that does not fit is a :class:`ConversionError`
listing the first ten of each. Writing maps every tensor or raises: nothing is passed through unnamed.

VAE (``ldm/autoencoder.py`` ``AutoencoderKL``, ``diffusionmodules/model.py`` ``Encoder``/``Decoder``):
``encoder.down.i.block.j``, ``mid.{block_1,attn_1,block_2}``, decoder ``up`` in reverse order, the
mid-attention ``q/k/v/proj_out`` as 1×1 convolutions ``[C, C, 1, 1]`` (``nemo_hf`` keeps linear ``[C, C]``).
Prefixes in a full model: ``model.diffusion_model.`` / ``first_stage_model.`` (NeMo's Megatron wrapper adds
one more ``model.``).

Each map is built from a diffusers model's own key list and config, so the same table drives both
directions and import∘export is the identity by construction. Tensors are never modified except for
the ``[C, C] ↔ [C, C, 1, 1]`` reshape of 1×1 convolutions vs linears.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from ..errors import found, some

LAYOUTS = ("ldm", "nemo_hf", "compvis")
# NeMo's UNetModel._strip_unet_key_prefix (openaimodel.py) strips the first five; the rest are ours.
UNET_PREFIXES = ("model.model.diffusion_model.", "model.diffusion_model.", "model._orig_mod.diffusion_model.",
                 "model.model._orig_mod.diffusion_model.", "model.model.diffusion_model._orig_mod.",
                 "diffusion_model.", "unet.", "")
VAE_PREFIXES = ("model.first_stage_model.", "first_stage_model.", "vae.", "")

# layout → (resnet/out conv indices, transformer-block spelling)
_STYLE = {"ldm": ("compvis", "nemo"), "nemo_hf": ("nemo", "nemo"), "compvis": ("compvis", "compvis")}
_CONV_INDICES = {"compvis": ("in_layers.2", "out_layers.3", "out.2"), "nemo": ("in_layers.1", "out_layers.2", "out.1")}
# diffusers BasicTransformerBlock module → NeMo's name (attention projections are named alike)
_NEMO_TBLOCK = {"norm1": "attn1.norm", "norm2": "attn2.norm", "norm3": "ff.net.0",
                "ff.net.0.proj": "ff.net.1.proj", "ff.net.2": "ff.net.3"}
_TBLOCK_MODULES = ("norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2",
                   *(f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")))
_PARAMS = ("weight", "bias")


class ConversionError(ValueError):
    """A checkpoint does not match the expected architecture/layout; the message lists what differs."""


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _split_param(name: str) -> Tuple[str, str]:
    module, _, param = name.rpartition(".")
    if param not in _PARAMS or not module:
        raise KeyError(name)
    return module, param


def _resnet(rest: str, indices: str) -> str:
    conv1, conv2, _ = _CONV_INDICES[indices]
    names = {"norm1": "in_layers.0", "conv1": conv1, "norm2": "out_layers.0", "conv2": conv2,
             "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
    module, param = _split_param(rest)
    if module not in names:
        raise KeyError(rest)
    return f"{names[module]}.{param}"


_TBLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")


def _attention(rest: str, tnames: str) -> str:
    """A ``Transformer2DModel`` tensor (after ``attentions.j.``) in ``tnames`` spelling (nemo | compvis)."""
    m = _TBLOCK.match(rest)
    if m is None:
        module, param = _split_param(rest)
        if module not in ("norm", "proj_in", "proj_out"):
            raise KeyError(rest)
        return rest
    t, sub = m.groups()
    module, param = _split_param(sub)
    if module not in _TBLOCK_MODULES:
        raise KeyError(rest)
    if tnames == "nemo":
        module = _NEMO_TBLOCK.get(module, module)
    return f"transformer_blocks.{t}.{module}.{param}"


def _per_level(value, n: int, what: str) -> List[int]:
    if isinstance(value, int):
        return [value] * n
    value = [int(v) for v in value]
    if len(value) != n:
        raise ConversionError(f"{what} {value} has {len(value)} entries for {n} UNet levels")
    return value


def _unet_names(keys: Iterable[str], config: Mapping, indices: str, tnames: str) -> Dict[str, str]:
    """diffusers key → NeMo key (no prefix) for one spelling; ConversionError listing unmapped keys."""
    n = len(config["down_block_types"])
    lpb = _per_level(config["layers_per_block"], n, "layers_per_block")  # diffusers' per-down-block order
    up_lpb = list(reversed(lpb))
    down_base = [1 + sum(v + 1 for v in lpb[:b]) for b in range(n)]
    up_base = [sum(v + 1 for v in up_lpb[:b]) for b in range(n)]
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out_conv = _CONV_INDICES[indices][2]
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": out_conv}
    out: Dict[str, str] = {}
    unmapped: List[str] = []
    for key in keys:
        try:
            module, param = _split_param(key)
            if module in fixed:
                out[key] = f"{fixed[module]}.{param}"
                continue
            parts = key.split(".")
            if parts[0] == "down_blocks":
                b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
                if kind == "resnets" and j < lpb[b]:
                    out[key] = f"input_blocks.{down_base[b] + j}.0.{_resnet(rest, indices)}"
                elif kind == "attentions" and j < lpb[b]:
                    out[key] = f"input_blocks.{down_base[b] + j}.1.{_attention(rest, tnames)}"
                elif kind == "downsamplers" and j == 0 and rest in ("conv.weight", "conv.bias"):
                    out[key] = f"input_blocks.{down_base[b] + lpb[b]}.0.op.{rest[5:]}"
                else:
                    raise KeyError(key)
            elif parts[0] == "mid_block":
                kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
                if kind == "resnets" and j in (0, 1):
                    out[key] = f"middle_block.{2 * j}.{_resnet(rest, indices)}"
                elif kind == "attentions" and j == 0:
                    out[key] = f"middle_block.1.{_attention(rest, tnames)}"
                else:
                    raise KeyError(key)
            elif parts[0] == "up_blocks":
                b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
                if kind == "resnets" and j <= up_lpb[b]:
                    out[key] = f"output_blocks.{up_base[b] + j}.0.{_resnet(rest, indices)}"
                elif kind == "attentions" and j <= up_lpb[b]:
                    out[key] = f"output_blocks.{up_base[b] + j}.1.{_attention(rest, tnames)}"
                elif kind == "upsamplers" and j == 0 and rest in ("conv.weight", "conv.bias"):
                    slot = 2 if up_has_attn[b] else 1
                    out[key] = f"output_blocks.{up_base[b] + up_lpb[b]}.{slot}.conv.{rest[5:]}"
                else:
                    raise KeyError(key)
            else:
                raise KeyError(key)
        except (KeyError, ValueError, IndexError):
            unmapped.append(key)
    if unmapped:
        raise ConversionError(f"{len(unmapped)} UNet keys have no NeMo equivalent (unsupported architecture), "
                              f"e.g. {unmapped[:10]}")
    if len(set(out.values())) != len(out):
        raise ConversionError("the UNet key map is not one-to-one (unsupported architecture)")
    return out


def unet_key_map(keys: Iterable[str], config: Mapping, layout: str = "ldm") -> Dict[str, str]:
    """diffusers ``UNet2DConditionModel`` key → NeMo key (without prefix) in ``layout``, for every key.

    ``config``: the UNet config (``down_block_types``, ``up_block_types``, ``layers_per_block`` — an int
    or one per level). Raises ``ConversionError`` listing keys the layout has no place for.
    """
    _check_layout(layout)
    return _unet_names(list(keys), config, *_STYLE[layout])


def strip_prefix(state: Mapping[str, torch.Tensor], prefixes, probe: str) -> Dict[str, torch.Tensor]:
    """The sub-dict under the first prefix in ``prefixes`` for which ``prefix + probe`` is a key."""
    for p in prefixes:
        if p + probe in state:
            return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
    sample = sorted(state)[:10]
    raise ConversionError(f"no key '<prefix>{probe}' with prefix in {list(prefixes)}: not a NeMo/LDM checkpoint of "
                          f"this model ({len(state)} keys, e.g. {sample})")


_COMPVIS_TBLOCK = re.compile(r"\.transformer_blocks\.\d+\.(norm[123]|ff\.net\.0\.proj|ff\.net\.2)\.")


def detect_unet_layout(nemo_state: Mapping[str, torch.Tensor]) -> str:
    """``ldm``, ``compvis`` or ``nemo_hf`` from the resnet conv indices and the transformer-block names
    (prefix already stripped)."""
    if "input_blocks.1.0.in_layers.2.weight" in nemo_state or "out.2.weight" in nemo_state:
        return "compvis" if any(_COMPVIS_TBLOCK.search(k) for k in nemo_state) else "ldm"
    if "input_blocks.1.0.in_layers.1.weight" in nemo_state or "out.1.weight" in nemo_state:
        return "nemo_hf"
    raise ConversionError("cannot tell the UNet layout: neither 'input_blocks.1.0.in_layers.2.weight' (LDM/CompVis) "
                          "nor 'input_blocks.1.0.in_layers.1.weight' (NeMo module names) is present")


def _describe(missing: List[str], unexpected: List[str], shapes: List[str], what: str,
              doubled: Sequence[str] = ()) -> str:
    return f"{what} does not match the target architecture: " + found(
        (missing, some(missing, "missing keys")), (unexpected, some(unexpected, "unexpected keys")),
        (shapes, some(shapes, "shape mismatches")), (doubled, some(doubled, "tensors present under two names")))


def _fit(t: torch.Tensor, want: Tuple[int, ...]) -> Optional[torch.Tensor]:
    """``t`` in shape ``want``, allowing only a 1×1 conv ↔ linear reshape; None if it does not fit."""
    if tuple(t.shape) == want:
        return t
    squeezed = tuple(s for s in t.shape if s != 1) == tuple(s for s in want if s != 1)
    numel = 1
    for s in want:
        numel *= s
    if t.numel() == numel and squeezed and t.ndim in (2, 4) and len(want) in (2, 4):
        return t.reshape(want)
    return None


def gather(source: Mapping[str, torch.Tensor], wanted: Mapping[str, Sequence[str]],
           template: Mapping[str, torch.Tensor], what: str, allow_unexpected: bool = False) -> Dict[str, torch.Tensor]:
    """For every target key of ``wanted`` (target key → the source names it may have), the one source
    tensor present under one of those names, checked against ``template[target]``'s shape.

    Missing, doubly present, unexpected (unless ``allow_unexpected``) or mis-shaped tensors raise one
    :class:`ConversionError` listing the first ten of each kind.
    """
    known = [c for cands in wanted.values() for c in cands]
    if len(set(known)) != len(known):
        raise ConversionError(f"{what}: the key map is not one-to-one")
    known_set = set(known)
    out: Dict[str, torch.Tensor] = {}
    missing, shapes, doubled = [], [], []
    for dst, cands in wanted.items():
        present = [c for c in cands if c in source]
        if not present:
            missing.append(cands[0])
            continue
        if len(present) > 1:
            doubled.append(" and ".join(present))
            continue
        src = present[0]
        want = tuple(template[dst].shape)
        t = _fit(source[src], want)
        if t is None:
            shapes.append(f"{src}: {tuple(source[src].shape)} vs expected {want}")
            continue
        out[dst] = t
    unexpected = [] if allow_unexpected else sorted(k for k in source if k not in known_set)
    if missing or shapes or unexpected or doubled:
        raise ConversionError(_describe(sorted(missing), unexpected, shapes, what, doubled))
    return out


def remap(source: Mapping[str, torch.Tensor], key_map: Mapping[str, str], template: Mapping[str, torch.Tensor],
          what: str, inverse: bool = False, allow_unexpected: bool = False) -> Dict[str, torch.Tensor]:
    """Rename ``source`` through ``key_map`` (diffusers → NeMo; ``inverse`` for NeMo → diffusers) and
    check every tensor against ``template`` (the target-side state dict: shapes); see :func:`gather`."""
    wanted = {k: [v] for k, v in key_map.items()} if inverse else {v: [k] for k, v in key_map.items()}
    return gather(source, wanted, template, what, allow_unexpected)


def unet_to_nemo(state: Mapping[str, torch.Tensor], config: Mapping, layout: str = "ldm") -> Dict[str, torch.Tensor]:
    """diffusers UNet state dict → NeMo layout (no prefix); every tensor is mapped or this raises."""
    key_map = unet_key_map(state.keys(), config, layout)
    template = {key_map[k]: v for k, v in state.items()}
    return remap(state, key_map, template, "diffusers UNet")


def unet_from_nemo(nemo_state: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor], config: Mapping,
                   layout: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """NeMo-layout UNet weights (prefix stripped) → diffusers keys, checked against ``template``
    (the target diffusers UNet's state dict).

    ``layout`` (default: detected) fixes the resnet/out conv indices; transformer-block tensors are
    accepted in NeMo's or CompVis' spelling, per tensor, so every NeMo/LDM checkpoint of any depth reads.
    """
    if layout is not None:
        _check_layout(layout)
    layout = layout or detect_unet_layout(nemo_state)
    indices, own = _STYLE[layout]
    keys = list(template.keys())
    # the layout's own spelling first: a missing tensor is named as this checkpoint would name it
    by_spelling = [_unet_names(keys, config, indices, t) for t in dict.fromkeys((own, "nemo", "compvis"))]
    wanted = {k: list(dict.fromkeys(m[k] for m in by_spelling)) for k in keys}
    return gather(nemo_state, wanted, template, f"NeMo UNet ({layout} layout)")


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# diffusers < 0.14 (and the SD 1.x Hub files NeMo's HF VAE mapping reads): the same attention, older names
_VAE_ATTN_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def vae_key_map(keys: Iterable[str], config: Mapping) -> Dict[str, str]:
    """diffusers ``AutoencoderKL`` key → LDM/NeMo VAE key (every NeMo layout uses the same names)."""
    n_up = len(config["up_block_types"])
    out: Dict[str, str] = {}
    unmapped: List[str] = []
    for key in keys:
        parts = key.split(".")
        try:
            _split_param(key)
            if parts[0] in ("quant_conv", "post_quant_conv") and len(parts) == 2:
                out[key] = key
                continue
            side, rest = parts[0], parts[1:]
            if side not in ("encoder", "decoder"):
                raise KeyError(key)
            if rest[0] in ("conv_in", "conv_out") and len(rest) == 2:
                out[key] = key
            elif rest[0] == "conv_norm_out" and len(rest) == 2:
                out[key] = f"{side}.norm_out.{rest[1]}"
            elif rest[0] in ("down_blocks", "up_blocks"):
                i = int(rest[1])
                stage = f"down.{i}" if rest[0] == "down_blocks" else f"up.{n_up - 1 - i}"
                if rest[2] == "resnets" and rest[4] in ("norm1", "conv1", "norm2", "conv2", "conv_shortcut"):
                    sub = ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
                    out[key] = f"{side}.{stage}.block.{int(rest[3])}.{sub}"
                elif rest[2] in ("downsamplers", "upsamplers") and rest[3] == "0" and rest[4] == "conv":
                    kind = "downsample" if rest[2] == "downsamplers" else "upsample"
                    out[key] = f"{side}.{stage}.{kind}.{'.'.join(rest[4:])}"
                else:
                    raise KeyError(key)
            elif rest[0] == "mid_block":
                if rest[1] == "resnets" and rest[2] in ("0", "1") \
                        and rest[3] in ("norm1", "conv1", "norm2", "conv2"):
                    out[key] = f"{side}.mid.block_{int(rest[2]) + 1}.{'.'.join(rest[3:])}"
                elif rest[1] == "attentions" and rest[2] == "0":
                    sub = ".".join(rest[3:])
                    for old, new in _VAE_ATTN.items():
                        if sub in (f"{old}.weight", f"{old}.bias"):
                            out[key] = f"{side}.mid.attn_1.{new}.{sub[len(old) + 1:]}"
                            break
                    else:
                        raise KeyError(key)
                else:
                    raise KeyError(key)
            else:
                raise KeyError(key)
        except (KeyError, ValueError, IndexError):
            unmapped.append(key)
    if unmapped:
        raise ConversionError(f"{len(unmapped)} VAE keys have no NeMo equivalent, e.g. {unmapped[:10]}")
    return out


def vae_from_legacy_diffusers_names(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A diffusers VAE state dict with the pre-0.14 mid-attention names (``query``/``key``/``value``/
    ``proj_attn``, as in SD 1.x's Hub ``vae/diffusion_pytorch_model.bin``) renamed to today's
    (``to_q``/``to_k``/``to_v``/``to_out.0``); other keys unchanged."""
    pattern = re.compile(r"^((?:encoder|decoder)\.mid_block\.attentions\.0\.)(query|key|value|proj_attn)\.(weight|bias)$")
    out = {}
    for k, v in state.items():
        m = pattern.match(k)
        out[f"{m[1]}{_VAE_ATTN_LEGACY[m[2]]}.{m[3]}" if m else k] = v
    return out


def vae_to_nemo(state: Mapping[str, torch.Tensor], config: Mapping, layout: str = "ldm") -> Dict[str, torch.Tensor]:
    """diffusers VAE state dict → NeMo layout; ``ldm``/``compvis`` store the mid-attention as 1×1 convs
    (NeMo's ``AttnBlock`` modules), ``nemo_hf`` as linears."""
    _check_layout(layout)
    key_map = vae_key_map(state.keys(), config)
    template = {}
    for k, v in state.items():
        conv = layout != "nemo_hf" and ".mid.attn_1." in key_map[k] and k.endswith(".weight") and v.ndim == 2
        template[key_map[k]] = v.reshape(*v.shape, 1, 1) if conv else v
    return remap(state, key_map, template, "diffusers VAE")


def vae_from_nemo(nemo_state: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor],
                  config: Mapping) -> Dict[str, torch.Tensor]:
    """NeMo-layout VAE weights (prefix stripped) → diffusers keys, checked against ``template``."""
    key_map = vae_key_map(template.keys(), config)
    return remap(nemo_state, key_map, template, "NeMo VAE", inverse=True)
