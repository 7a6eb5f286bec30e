"""LoRA soup: mix two LoRA adapters (or one adapter and the base model) with a coefficient α.

A LoRA module holds factors A ``[r, in]`` (``lora_A``) and B ``[out, r]`` (``lora_B``; conv LoRA:
``[r, in, k, k]`` and ``[out, r, 1, 1]``) and adds ΔW = s·B A to the frozen weight, s = lora_alpha/r.

Two conventions (the issue asks to state which one is used):

* ``"delta"`` (default): **ΔW is mixed linearly**, exactly:
  ΔW_soup = α ΔW_1 + (1 − α) ΔW_2, and ΔW_soup = α ΔW_1 for one adapter against the base.
  Two adapters are represented exactly by stacking the factors along the rank axis,
  A = [A_1; A_2], B = [α s_1 B_1, (1 − α) s_2 B_2] — the result has rank r_1 + r_2 and its scale is
  folded into B, so it must be loaded with scaling 1 (``lora_alpha = rank``; see
  :func:`soup_rank`). One adapter against the base keeps its rank: B is scaled by α only.
* ``"factors"`` (AlignProp's mixing): **both factors are interpolated**,
  A = α A_1 + (1 − α) A_2, B = α B_1 + (1 − α) B_2 (same ranks and scales required; the base model
  counts as A = B = 0). Then ΔW_soup = α² ΔW_1 for one adapter, and for two adapters ΔW contains the
  cross terms α(1 − α)(B_1 A_2 + B_2 A_1) — not a linear interpolation of the two models.

All functions are pure: state dicts in, state dict out (tensors are not modified in place).
Supported key names: peft/diffusers ``<module>.lora_A[.<adapter>].weight`` and ``...lora_B...``.
"""
from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

import torch

StateDict = Dict[str, torch.Tensor]

_KEY = re.compile(r"^(?P<prefix>.*)\.lora_(?P<which>[AB])(?P<suffix>(\.[^.]+)?\.weight)$")
SOUP_MODES = ("delta", "factors")


def lora_pairs(state: StateDict, name: str = "lora") -> Dict[str, Tuple[str, str]]:
    """Map each LoRA module (key without ``.lora_A…``) to its (A key, B key). Errors name the key."""
    found: Dict[str, Dict[str, str]] = {}
    for key in state:
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"{name}: key {key!r} is not a LoRA factor (expected '<module>.lora_A.weight' "
                             f"or '<module>.lora_B.weight', optionally with an adapter name)")
        found.setdefault(m["prefix"] + m["suffix"], {})[m["which"]] = key
    pairs = {}
    for module, ab in found.items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise ValueError(f"{name}: module {module!r} has no {missing} factor")
        a, b = state[ab["A"]], state[ab["B"]]
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"{name}: {ab['A']!r} has rank {a.shape[0]} but {ab['B']!r} has rank {b.shape[1]}")
        pairs[module] = (ab["A"], ab["B"])
    return pairs


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """ΔW = scale·B A for linear (A ``[r, in]``, B ``[out, r]``) or conv (A ``[r, in, k, k]``,
    B ``[out, r, 1, 1]``) factors, in float64 for exact comparisons."""
    a, b = a.double(), b.double()
    if a.ndim == 2:
        return scale * (b @ a)
    if a.ndim == 4:
        return scale * torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
    raise ValueError(f"LoRA factors must be 2-D or 4-D, got A with shape {tuple(a.shape)}")


def soup_lora(first: StateDict, second: Optional[StateDict], alpha: float, mode: str = "delta",
              scale_first: float = 1.0, scale_second: float = 1.0) -> StateDict:
    """Mix ``first`` (weight α) with ``second`` (weight 1 − α; None = the base model).

    ``scale_*``: each adapter's s = lora_alpha / r. Mode ``delta`` with two adapters folds the
    scales into B (load the result with scaling 1); in every other case the result keeps the keys
    and ranks of ``first`` and the scale of ``first``.
    """
    if mode not in SOUP_MODES:
        raise ValueError(f"soup mode must be one of {SOUP_MODES}, got {mode!r}")
    pairs1 = lora_pairs(first, "first LoRA")
    if second is None:
        if mode == "delta":  # ΔW = α ΔW_1: scale B only
            return {k: (v * alpha if k in {b for _, b in pairs1.values()} else v.clone())
                    for k, v in first.items()}
        return {k: v * alpha for k, v in first.items()}  # factors: ΔW = α² ΔW_1
    pairs2 = lora_pairs(second, "second LoRA")
    if set(pairs1) != set(pairs2):
        only = sorted(set(pairs1) ^ set(pairs2))[:3]
        raise ValueError(f"the two LoRAs adapt different modules (e.g. {only}); a soup needs the same targets")
    out: StateDict = {}
    for module, (ka, kb) in pairs1.items():
        a1, b1 = first[ka], first[kb]
        a2, b2 = second[pairs2[module][0]], second[pairs2[module][1]]
        if a1.shape[1:] != a2.shape[1:] or b1.shape[0] != b2.shape[0]:
            raise ValueError(f"LoRA module {module!r}: factor shapes differ ({tuple(a1.shape)}/{tuple(b1.shape)} "
                             f"vs {tuple(a2.shape)}/{tuple(b2.shape)})")
        if mode == "factors":
            if a1.shape != a2.shape:
                raise ValueError(f"LoRA module {module!r}: 'factors' soup needs equal ranks, got "
                                 f"{a1.shape[0]} and {a2.shape[0]}")
            if scale_first != scale_second:
                raise ValueError("'factors' soup needs equal LoRA scales (lora_alpha / r)")
            out[ka] = alpha * a1 + (1 - alpha) * a2.to(a1)
            out[kb] = alpha * b1 + (1 - alpha) * b2.to(b1)
        else:
            out[ka] = torch.cat([a1, a2.to(a1)], dim=0)
            out[kb] = torch.cat([alpha * scale_first * b1, (1 - alpha) * scale_second * b2.to(b1)], dim=1)
    return out


def soup_rank(state: StateDict) -> Dict[str, int]:
    """Rank of every LoRA module of a (souped) state dict, for building the adapter config."""
    return {m: int(state[a].shape[0]) for m, (a, _) in lora_pairs(state).items()}


def soup_deltas(first: StateDict, second: Optional[StateDict], alpha: float, mode: str = "delta",
                scale_first: float = 1.0, scale_second: float = 1.0) -> Dict[str, torch.Tensor]:
    """ΔW of every module of the soup (float64), e.g. to merge it into the base weights."""
    soup = soup_lora(first, second, alpha, mode, scale_first, scale_second)
    folded = second is not None and mode == "delta"
    scale = 1.0 if folded else scale_first
    return {m: lora_delta(soup[a], soup[b], scale) for m, (a, b) in lora_pairs(soup, "soup").items()}
