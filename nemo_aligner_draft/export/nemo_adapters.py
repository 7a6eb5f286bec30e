"""NeMo-Aligner's LoRA adapters on disk, and their diffusers/peft equivalents (both directions).

What NeMo writes (NeMo v2.1.0; NeMo-Aligner's DRaFT+ uses the same code):

* One ``ParallelLinearAdapter`` named ``parallel_linear_adapter`` (``AdapterName.PARALLEL_LINEAR_ADAPTER``,
  nemo/collections/nlp/modules/common/megatron/adapters/parallel_adapters.py:91) in the ``adapter_layer``
  ModuleDict (nemo/core/classes/mixins/adapter_mixins.py:249, 274) of every ``LinearWrapper`` of the UNet
  (ddpm.py:2282-2295). Its two bias-free linears give the state-dict keys
  ``<module>.adapter_layer.parallel_linear_adapter.linear_in.weight`` ``[r, in]`` and
  ``<module>.adapter_layer.parallel_linear_adapter.linear_out.weight`` ``[out, r]``
  (parallel_adapters.py:212-243; ``gather_output=False`` in SDLoraPEFTConfig, peft_config.py:406),
  ``<module>`` being the LinearWrapper itself — ``...attn1.to_out.0``,
  not the ``to_out`` Sequential (attention.py:299-301); NeMo's own LoRA merge script strips exactly
  ``.adapter_layer.parallel_linear_adapter.linear_in`` to find the base weight
  (scripts/diffusion_model_lora_merge/merge_lora_weights_into_base_model.py:46).
* The UNet sits at ``model.model.diffusion_model.`` (MegatronLatentDiffusion.model → LatentDiffusion,
  its ``.model`` → DiffusionWrapper, its ``.diffusion_model`` → UNetModel; ddpm.py:1700, 138, 2366; the
  SDXL DiffusionEngine has the same nesting). ``get_peft_state_dict`` keeps only the adapter keys and
  writes ``model.module.`` (megatron_amp_O2) as ``model.`` (nlp_adapter_mixins.py:424-444); ``._orig_mod``
  (torch.compile) is dropped by NeMo's own ``load_adapters`` (ddpm.py:2328).
* NeMo-Aligner's SD DRaFT+ model also holds the frozen reference as ``self.init_model``
  (nemo_aligner/models/mm/stable_diffusion/megatron_sd_draftp_model.py:58). ``add_adapter`` walks
  ``self.named_modules()`` (nlp_adapter_mixins.py:217), so the reference gets adapters too, and a full
  state dict of the model (``super().state_dict()``, what ``state_dict`` returns whenever the PEFT filter
  is off, nlp_adapter_mixins.py:446-456) holds them as
  ``init_model.model.diffusion_model.<module>.adapter_layer.parallel_linear_adapter.linear_{in,out}.weight``
  next to every base weight. NeMo before 2.0 also counted them among ``adapter_keys`` (v1.23.0
  nlp_adapter_mixins.py:89-96 collects ``self.named_parameters()``; v2.1.0 only ``self.model``'s,
  117-131), which its ``load_adapters`` key check compares against. The reference adapters never change
  the reference (it runs under no_grad, so linear_out keeps its zero init): the import drops them, the
  export writes them (linear_out zero) only when asked.

The forward is y = W x + s·linear_out(linear_in(x)) with s = network_alpha / r, or 1 when
network_alpha is null (attention.py:235-238): peft's lora_A = linear_in, lora_B = linear_out with
lora_alpha = network_alpha (r when null) is the same ΔW = s·B A.
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from ..errors import found, some
from .ldm_layout import ConversionError, unet_key_map

ADAPTER_NAME = "parallel_linear_adapter"
POLICY_PREFIX = "model.model.diffusion_model."
REFERENCE_PREFIX = "init_model.model.diffusion_model."
_IN, _OUT = "linear_in", "linear_out"

# Inside one BasicTransformerBlock: diffusers module → NeMo LinearWrapper (attention.py:106, 129-130,
# 285-301). diffusers' GEGLU keeps its projection at ff.net.0.proj, NeMo's FeedForward.net has the
# LayerNorm first: Sequential(norm, GEGLU, Dropout, LinearWrapper).
_BLOCK_LINEARS = {
    **{f"attn{a}.{p}": f"attn{a}.{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")},
    "ff.net.0.proj": "ff.net.1.proj",
    "ff.net.2": "ff.net.3",
}
_BLOCK_RE = re.compile(r"^(?P<container>.+)\.transformer_blocks\.(?P<t>\d+)\.(?P<rest>.+)$")
_KEY_RE = re.compile(r"^(?P<module>.+)\.adapter_layer\.(?P<name>[^.]+)\.(?P<which>linear_in|linear_out)\.weight$")


def adapter_module_map(unet) -> Dict[str, str]:
    """diffusers module name → NeMo module path (no prefix) for every module of ``unet`` that NeMo's
    SDLoraPEFTConfig adapts: the ten LinearWrappers of each transformer block."""
    modules = dict(unet.named_modules())
    # the base keys (a peft-wrapped layer keeps its weight under ``base_layer``)
    keys = [k.replace(".base_layer.", ".") for k in unet.state_dict() if "lora_" not in k]
    # the NeMo position of each transformer container (down/mid/up ``attentions.j``), found through the
    # key map of its proj_in, which keeps its name in every NeMo layout
    key_map = unet_key_map(keys, unet.config, "ldm")
    out: Dict[str, str] = {}
    for name, module in modules.items():
        m = _BLOCK_RE.match(name)
        if m is None or m["rest"] not in _BLOCK_LINEARS:
            continue
        container = m["container"]
        probe = f"{container}.proj_in.weight"
        if probe not in key_map:
            raise ConversionError(f"transformer block {name!r} has no NeMo position (no {probe!r} in the key map)")
        nemo_container = key_map[probe][: -len("proj_in.weight")]
        rest = _BLOCK_LINEARS[m["rest"]]
        if m["rest"] == "ff.net.0.proj":
            act = type(modules[f"{container}.transformer_blocks.{m['t']}.ff.net.0"]).__name__
            if act == "GELU":  # FeedForward(glu=False): Sequential(LinearWrapper, GELU) at net.1
                rest = "ff.net.1.0"
            elif act != "GEGLU":
                raise ConversionError(f"{name}: feed-forward activation {act} has no NeMo counterpart")
        out[name] = f"{nemo_container}transformer_blocks.{m['t']}.{rest}"
    if not out:
        raise ConversionError("the UNet has no transformer block linears (nothing NeMo's sdlora would adapt)")
    return out


def _normalise(key: str) -> str:
    # megatron_amp_O2 wraps the model in Float16Module (``model.module.``); torch.compile adds ``._orig_mod``
    if key.startswith("model.module."):
        key = "model." + key[len("model.module."):]
    return key.replace("._orig_mod", "")


def nemo_adapter_key(prefix: str, module: str, which: str) -> str:
    return f"{prefix}{module}.adapter_layer.{ADAPTER_NAME}.{which}.weight"


class NemoAdapters:
    """The adapters of one NeMo-Aligner checkpoint: ``policy`` / ``reference`` map a NeMo module path
    (no prefix) to ``{"linear_in": A, "linear_out": B}``."""

    def __init__(self, policy: Dict[str, Dict[str, torch.Tensor]], reference: Dict[str, Dict[str, torch.Tensor]],
                 ignored: int):
        self.policy, self.reference, self.ignored = policy, reference, ignored


def parse_nemo_adapters(weights: Mapping[str, torch.Tensor]) -> NemoAdapters:
    """Sort the adapter keys of a NeMo state dict into policy (``model.``) and reference
    (``init_model.``) adapters. Base weights, present when a full state dict was saved, are ignored;
    adapters elsewhere (text encoder ``*_lora`` wrappers, other adapter types) are an error."""
    policy: Dict[str, Dict[str, torch.Tensor]] = {}
    reference: Dict[str, Dict[str, torch.Tensor]] = {}
    bad: List[str] = []
    ignored = 0
    for raw_key, value in weights.items():
        key = _normalise(raw_key)
        m = _KEY_RE.match(key)
        if m is None:
            if ".adapter_layer." in key:
                bad.append(raw_key)
            else:
                ignored += 1
            continue
        module = m["module"]
        if m["name"] != ADAPTER_NAME:
            bad.append(raw_key)
            continue
        for prefix, into in ((POLICY_PREFIX, policy), (REFERENCE_PREFIX, reference)):
            if module.startswith(prefix):
                slot = into.setdefault(module[len(prefix):], {})
                if m["which"] in slot:
                    bad.append(f"{raw_key} (given twice)")
                slot[m["which"]] = value
                break
        else:
            bad.append(raw_key)
    if bad:
        raise ConversionError(f"{len(bad)} adapter keys are not UNet ParallelLinearAdapters of NeMo's sdlora "
                              f"('{POLICY_PREFIX}<module>.adapter_layer.{ADAPTER_NAME}.linear_in.weight', or under "
                              f"'{REFERENCE_PREFIX}'), e.g. {bad[:10]}")
    if not policy:
        found = "only reference ('init_model.') adapters" if reference else "none"
        raise ConversionError(f"no NeMo-Aligner policy adapters ('{POLICY_PREFIX}<module>.adapter_layer."
                              f"{ADAPTER_NAME}.linear_in.weight') among {len(weights)} keys ({found}), "
                              f"e.g. {sorted(weights)[:10]}")
    return NemoAdapters(policy, reference, ignored)


def _check_pairs(adapters: Dict[str, Dict[str, torch.Tensor]], what: str, shapes: Mapping[str, Tuple[int, int]],
                 inverse: Mapping[str, str]) -> int:
    """The common rank of ``adapters``; every module must be a known LinearWrapper with both factors
    of the right shapes. ``shapes``: diffusers module → (out, in) of its weight."""
    unknown, incomplete, wrong, ranks = [], [], [], set()
    for module, pair in adapters.items():
        target = inverse.get(module)
        if target is None:
            unknown.append(module)
            continue
        if set(pair) != {_IN, _OUT}:
            incomplete.append(f"{module}: has {sorted(pair)}")
            continue
        a, b = pair[_IN], pair[_OUT]
        out_f, in_f = shapes[target]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            wrong.append(f"{module}: linear_in {tuple(a.shape)}, linear_out {tuple(b.shape)} "
                         f"(the layer is [{out_f}, {in_f}])")
            continue
        ranks.add(int(a.shape[0]))
    problems = found((unknown, some(sorted(unknown), "modules are no LinearWrapper of the base UNet")),
                     (incomplete, some(incomplete, "lack linear_in or linear_out")),
                     (wrong, some(wrong, "do not fit the base UNet's layers")))
    if problems:
        raise ConversionError(f"{what}: {problems}")
    if len(ranks) != 1:
        raise ConversionError(f"{what} have different ranks {sorted(ranks)}; NeMo uses one adapter_dim")
    return ranks.pop()


def _layer_shapes(unet, names) -> Dict[str, Tuple[int, int]]:
    modules = dict(unet.named_modules())
    out = {}
    for name in names:
        m = modules[name]
        m = getattr(m, "base_layer", m)  # a peft-wrapped layer
        out[name] = (int(m.out_features), int(m.in_features))
    return out


def nemo_to_peft(weights: Mapping[str, torch.Tensor], unet) -> Tuple[Dict[str, torch.Tensor], int, NemoAdapters]:
    """NeMo-Aligner adapter state dict → (peft LoRA state dict ``<module>.lora_{A,B}.weight``, rank,
    the parsed adapters). Tensors are taken as they are (no copy of values, no dtype change)."""
    adapters = parse_nemo_adapters(weights)
    module_map = adapter_module_map(unet)
    inverse = {v: k for k, v in module_map.items()}
    shapes = _layer_shapes(unet, module_map)
    rank = _check_pairs(adapters.policy, "NeMo adapters", shapes, inverse)
    if adapters.reference:
        ref_rank = _check_pairs(adapters.reference, "NeMo reference ('init_model.') adapters", shapes, inverse)
        if ref_rank != rank:
            raise ConversionError(f"reference adapters have rank {ref_rank}, the policy's {rank}")
    state: Dict[str, torch.Tensor] = {}
    for module, pair in adapters.policy.items():
        name = inverse[module]
        state[f"{name}.lora_A.weight"] = pair[_IN].contiguous()
        state[f"{name}.lora_B.weight"] = pair[_OUT].contiguous()
    return state, rank, adapters


def peft_to_nemo(state: Mapping[str, torch.Tensor], unet, with_reference: bool = False,
                 fill_missing: bool = False) -> Tuple[Dict[str, torch.Tensor], int, List[str]]:
    """peft LoRA state dict → NeMo-Aligner adapter state dict (policy under ``model.``, and with
    ``with_reference`` NeMo 1.x's ``init_model.`` copies: linear_in the policy's, linear_out zero).

    NeMo's ``load_adapters`` requires an adapter on every LinearWrapper (``assert set(state_dict.keys())
    == self.adapter_keys``, ddpm.py:2353): modules the LoRA lacks are an error, or with ``fill_missing``
    adapters with both factors zero (ΔW = 0). Returns (state dict, rank, the filled modules)."""
    module_map = adapter_module_map(unet)
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    bad = []
    for key, value in state.items():
        name, sep, tail = key.rpartition(".lora_")
        if not sep or tail not in ("A.weight", "B.weight"):
            bad.append(key)
            continue
        pairs.setdefault(name, {})[_IN if tail == "A.weight" else _OUT] = value
    if bad:
        raise ConversionError(f"{len(bad)} keys are not peft LoRA factors '<module>.lora_A.weight', e.g. {bad[:10]}")
    foreign = sorted(n for n in pairs if n not in module_map)
    if foreign:
        raise ConversionError(f"{len(foreign)} LoRA modules have no NeMo LinearWrapper (NeMo's sdlora adapts only "
                              f"attention to_q/to_k/to_v/to_out.0 and ff.net.0.proj/ff.net.2), e.g. {foreign[:10]}")
    shapes = _layer_shapes(unet, module_map)
    nemo_pairs = {module_map[n]: p for n, p in pairs.items()}
    rank = _check_pairs(nemo_pairs, "LoRA factors", shapes, {v: k for k, v in module_map.items()})
    missing = sorted(n for n in module_map if n not in pairs)
    if missing and not fill_missing:
        raise ConversionError(f"NeMo's load_adapters needs an adapter on every LinearWrapper; this LoRA lacks "
                              f"{len(missing)} of {len(module_map)}, e.g. {missing[:10]} (fill them with zero "
                              f"adapters, ΔW = 0, with --fill-missing)")
    for name in missing:
        out_f, in_f = shapes[name]
        dtype = next(iter(pairs.values()))[_IN].dtype
        nemo_pairs[module_map[name]] = {_IN: torch.zeros(rank, in_f, dtype=dtype),
                                        _OUT: torch.zeros(out_f, rank, dtype=dtype)}
    out: Dict[str, torch.Tensor] = {}
    for module in sorted(nemo_pairs):
        pair = nemo_pairs[module]
        out[nemo_adapter_key(POLICY_PREFIX, module, _IN)] = pair[_IN].contiguous()
        out[nemo_adapter_key(POLICY_PREFIX, module, _OUT)] = pair[_OUT].contiguous()
    if with_reference:
        for module in sorted(nemo_pairs):
            pair = nemo_pairs[module]
            out[nemo_adapter_key(REFERENCE_PREFIX, module, _IN)] = pair[_IN].clone().contiguous()
            out[nemo_adapter_key(REFERENCE_PREFIX, module, _OUT)] = torch.zeros_like(pair[_OUT]).contiguous()
    return out, rank, missing


def network_alpha_of(config: Optional[Mapping]) -> Tuple[bool, Optional[float]]:
    """(found, network_alpha) from a NeMo model config's ``peft.lora_tuning``; found is False when the
    config does not say (no config, or no such key)."""
    lt = ((config or {}).get("peft") or {}).get("lora_tuning") or {}
    if "network_alpha" not in lt:
        return False, None
    value = lt["network_alpha"]
    return True, (None if value in (None, 0) else float(value))
