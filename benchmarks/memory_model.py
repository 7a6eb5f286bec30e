"""A memory model of one DRaFT+ training step: predicted peak memory for (family, K, T, micro-batch,
resolution, precision), the terms it adds, and its check against the CPU full-size measurements.

    peak = runtime + weights(family, reward, dtypes) + LoRA state
           + a_unet · calls · cfg·B · (H/8)(W/8) · act_bytes  (denoiser steps with grad; cfg = 2 with a
                                                              classifier-free batch, 1 for FLUX's embedded guidance)
           + a_vae · B · H · W · act_bytes                    (the decoder's saved activations)
           + a_reward · B · act_bytes                         (the reward tower at its own 224 px input)
           + a_bwd · B · H · W · act_bytes                    (backward's transient peak over the forward)

``calls`` is K without sampler checkpointing and 1 with it (each step's graph is rebuilt in backward;
what stays is one latent per step, counted too). The weights are exact (parameter counts of the
published configs, built on the meta device; the denoiser is the UNet, or SD3's / FLUX's transformer),
and so are the denoiser's floating-point buffers (SD3.5-M's fixed position table, 0.84 GiB in fp32).
Families: ``sd`` (SD1.5), ``sdxl``, ``sd3`` (SD3.5-Medium with T5-XXL), ``flux`` (FLUX.1-dev). FLUX's CPU
rows are built with fewer blocks of the published width (19 double + 38 single do not fit in 24 GiB):
``a_unet = a_0 + a_block · d`` for d double blocks (with 2d single ones) is fitted on two depths and taken
at d = 19. The flow families' CPU rows build T5-XXL with fewer blocks; its weights here are the published
encoder's.

``--algorithm grpo`` predicts a GRPO training step instead: the weights, the LoRA state, the rollout's
stored latents (T + 1 per sample of the batch) and one denoiser call with grad on the train micro-batch
(the same ``a_unet``; no decode or reward graph). No measurement checks that prediction yet. The four activation coefficients (bytes per element of
fp32, i.e. ``act_bytes`` = 4) are fitted on one measured configuration; the other measurements check
the prediction. Under bf16 autocast the activations are taken at 2 bytes — an assumption this CPU
machine cannot check (it is what the GPU script, benchmarks/gpu_check.sh, measures).

Usage: python benchmarks/memory_model.py --family sd --height 512 --k 1 --steps 50 --precision bf16-mixed
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List

GIB = 2**30
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def _count(build) -> int:
    import torch

    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())


def _count_float_buffers(build) -> int:
    """Elements of the module's floating-point buffers (SD3's fixed 2-D position table: 384² × 1536)."""
    import torch

    with torch.device("meta"):
        module = build()
    return sum(b.numel() for b in module.buffers() if b.is_floating_point())


FLOW = ("sd3", "flux")
FLUX_DEPTH = (19, 38)
LATENT_CHANNELS = {"sd": 4, "sdxl": 4, "sd3": 16, "flux": 16}


def _denoiser_and_texts(family: str, depth=None, t5_layers=None):
    """(denoiser builder, VAE config, text encoder builders) of the family's published shapes."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from nemo_aligner_draft.testing import realsize as R

    def clip(spec, cls=CLIPTextModel):
        return lambda: cls(CLIPTextConfig(**spec))

    t5 = dict(R.T5_XXL, **({} if t5_layers is None else {"num_layers": int(t5_layers)}))
    t5_build = lambda: T5EncoderModel(T5Config(**t5))  # noqa: E731
    if family == "sd":
        return lambda: UNet2DConditionModel(**R.SD15_UNET), R.SD15_VAE, [clip(R.SD15_TEXT)]
    if family == "sdxl":
        return (lambda: UNet2DConditionModel(**R.SDXL_UNET), R.SDXL_VAE,
                [clip(R.SDXL_TEXT), clip(R.SDXL_TEXT_2, CLIPTextModelWithProjection)])
    if family == "sd3":
        return (lambda: SD3Transformer2DModel(**R.SD35M_TRANSFORMER), R.SD3_VAE,
                [clip(R.SD3_CLIP_L, CLIPTextModelWithProjection), clip(R.SD3_CLIP_G, CLIPTextModelWithProjection),
                 t5_build])
    if family == "flux":
        d, s = depth or FLUX_DEPTH
        spec = dict(R.FLUX_DEV_TRANSFORMER, num_layers=int(d), num_single_layers=int(s))
        return lambda: FluxTransformer2DModel(**spec), R.FLUX_VAE, [clip(R.SD3_CLIP_L), t5_build]
    raise ValueError(f"family must be one of sd, sdxl, sd3, flux; got {family!r}")


def param_counts(family: str, reward: str = "pickscore", depth=None, t5_layers=None) -> Dict[str, int]:
    """Parameter counts of the family's denoiser (key ``unet``: the UNet or the transformer), VAE decoder,
    text encoders and the reward backbone. ``depth`` (flux: double, single blocks) and ``t5_layers``: the
    reduced builds of the CPU rows; None is the published model."""
    from diffusers import AutoencoderKL
    from transformers import CLIPConfig, CLIPModel

    from nemo_aligner_draft.testing import realsize as R

    denoiser, vae, texts = _denoiser_and_texts(family, depth, t5_layers)

    def vae_decoder():
        m = AutoencoderKL(**vae)
        m.encoder = None  # the backend drops the encoder (reward fine-tuning never encodes)
        return m

    spec = R.REWARD_CLIPS[reward]
    return {"unet": _count(denoiser), "unet_buffers": _count_float_buffers(denoiser), "vae": _count(vae_decoder),
            "text_encoders": sum(_count(t) for t in texts),
            "reward": _count(lambda: CLIPModel(CLIPConfig(text_config=spec["text_config"],
                                                          vision_config=spec["vision_config"],
                                                          projection_dim=spec["projection_dim"])))}


def predict(coef: Dict[str, float], family: str, k: int, steps: int, micro_batch: int, height: int, width: int,
            precision: str = "32", sampler_checkpointing: bool = False, lora_params: int = 0,
            unet_dtype: str = "fp32", runtime_gib: float = 0.0, reward: str = "pickscore", depth=None,
            t5_layers=None, algorithm: str = "draftp") -> Dict[str, float]:
    """Predicted peak memory (GiB) and its terms. ``precision``: 32, bf16-mixed or 16-mixed — the frozen
    text encoders, VAE (unless its config's force_upcast: SDXL, SD3, FLUX) and reward are stored at its
    width; the denoiser base at ``unet_dtype``. ``depth`` / ``t5_layers``: a reduced build (CPU rows).
    ``algorithm="grpo"``: a GRPO step, ``micro_batch`` its train micro-batch, ``k`` ignored."""
    half = not str(precision).startswith("32")
    store = "bf16" if half else "fp32"
    act = 2 if half else 4
    n = param_counts(family, reward, depth, t5_layers)
    vae_dtype = "fp32" if family in ("sdxl", "sd3", "flux") else store
    cfg = 1 if family == "flux" else 2
    if family == "flux":  # per-block activations, at the depth being predicted
        unit = int((depth or FLUX_DEPTH)[0])
        a_unet = coef["unet"] + coef.get("unet_per_block", 0.0) * unit
    else:
        a_unet = coef["unet"]
    weights = (n["unet"] * BYTES[unet_dtype if half else "fp32"] + n["vae"] * BYTES[vae_dtype]
               + n["text_encoders"] * BYTES[store] + n["reward"] * BYTES[store])
    lora_state = lora_params * 4 * 4  # fp32 weights, grads, Adam's two moments
    latent_px = (height // 8) * (width // 8)
    channels = LATENT_CHANNELS[family]
    if algorithm == "grpo":
        terms = {"runtime": runtime_gib * GIB, "weights": weights, "lora_state": lora_state,
                 "buffers": n["unet_buffers"] * BYTES[unet_dtype if half else "fp32"],
                 "rollout_latents": (steps + 1) * micro_batch * channels * latent_px * 4,
                 "unet_steps": a_unet * cfg * micro_batch * latent_px * act}
        out = {name: v / GIB for name, v in terms.items()}
        out["predicted_gib"] = sum(out.values())
        return out
    calls = 1 if sampler_checkpointing else k
    terms = {
        "runtime": runtime_gib * GIB,
        "weights": weights,
        "lora_state": lora_state,
        "buffers": n["unet_buffers"] * BYTES[unet_dtype if half else "fp32"],
        "unet_steps": a_unet * calls * cfg * micro_batch * latent_px * act
        + (k * micro_batch * channels * latent_px * 4 if sampler_checkpointing else 0),
        # SDXL's, SD3's and FLUX's VAE have force_upcast: they decode in fp32 even under autocast
        "decode": coef["vae"] * micro_batch * height * width * (4 if vae_dtype == "fp32" else act),
        "reward": coef["reward"] * micro_batch * act,
        "backward": coef["bwd"] * micro_batch * height * width * act,
    }
    out = {name: v / GIB for name, v in terms.items()}
    out["predicted_gib"] = sum(out.values())
    return out


def _cfg(family: str) -> int:
    return 1 if family == "flux" else 2


def fit(row: Dict) -> Dict[str, float]:
    """Activation coefficients (elements per latent/image pixel) from one measured fp32 CPU row."""
    latent_px = (row["height"] // 8) ** 2
    calls = 1 if row["sampler_checkpointing"] else row["K"]
    added = {name: v * GIB for name, v in row["added_gib"].items()}
    return {"unet": max(added["unet_steps"], 0.0) / (calls * _cfg(row["family"]) * row["micro_batch"] * latent_px * 4),
            "vae": max(added["decode"], 0.0) / (row["micro_batch"] * row["height"] ** 2 * 4),
            "reward": max(added["reward"], 0.0) / (row["micro_batch"] * 4),
            "bwd": max(added["backward_peak_over_forward"], 0.0) / (row["micro_batch"] * row["height"] ** 2 * 4)}


def _depth(row: Dict):
    b = row.get("blocks") or {}
    return (b["double"], b["single"]) if row["family"] == "flux" and b else None


def fit_rows(rows: List[Dict]) -> Dict[str, float]:
    """The coefficients of a family's CPU rows: :func:`fit` on the first row; for FLUX, ``a_unet`` as a line in
    the double-block count through the first row and the first one of another depth at the same resolution,
    K and sampler checkpointing."""
    first = rows[0]
    coef = fit(first)
    if first["family"] != "flux":
        return coef
    same = [r for r in rows[1:] if _depth(r) != _depth(first) and r["height"] == first["height"]
            and r["K"] == first["K"] and r["sampler_checkpointing"] == first["sampler_checkpointing"]]
    if same:
        other = same[-1]
        d0, d1 = _depth(first)[0], _depth(other)[0]
        a0, a1 = coef["unet"], fit(other)["unet"]
        coef["unet_per_block"] = (a1 - a0) / (d1 - d0)
        coef["unet"] = a0 - coef["unet_per_block"] * d0
    else:  # one depth: all of it per block
        coef["unet_per_block"], coef["unet"] = coef["unet"] / _depth(first)[0], 0.0
    return coef


def _lora_params(row: Dict) -> int:
    return int(round(row["weights_gib"]["lora"] * GIB / 4))


def check_against(rows: List[Dict]) -> Dict:
    """Fit on the first row (FLUX: and on a second depth, :func:`fit_rows`), predict every row (the rows fitted
    on are then exact by construction up to the rounding of their terms); the error is (predicted − measured
    peak RSS) / measured."""
    first = rows[0]
    coef = fit_rows(rows)
    out = []
    for r in rows:
        p = predict(coef, r["family"], r["K"], r["steps"], r["micro_batch"], r["height"], r["height"], "32",
                    r["sampler_checkpointing"], _lora_params(r), runtime_gib=r["rss_gib"]["process_start"],
                    reward=r["reward"], depth=_depth(r), t5_layers=r.get("t5_layers"))
        measured = r["peak_rss_gib"]
        out.append({"height": r["height"], "K": r["K"], "depth": _depth(r), "measured_gib": measured,
                    "predicted_gib": p["predicted_gib"], "error": (p["predicted_gib"] - measured) / measured,
                    "terms_gib": p})
    fitted = f"{first['height']} px K={first['K']}" + (f", depths {sorted({_depth(r) for r in rows})}" if _depth(first) else "")
    return {"fitted_on": fitted, "coefficients": {k: round(v, 2) for k, v in coef.items()},
            "rows": out}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=("sd", "sdxl", "sd3", "flux"), default="sd")
    ap.add_argument("--algorithm", choices=("draftp", "grpo"), default="draftp")
    ap.add_argument("--reward", default="pickscore", choices=("pickscore", "hpsv2", "aesthetic"))
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--precision", default="bf16-mixed")
    ap.add_argument("--sampler-checkpointing", action="store_true")
    ap.add_argument("--unet-dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--lora-params", type=int, default=0)
    ap.add_argument("--measurements", help="the CPU measurements the coefficients are fitted on (default "
                    "benchmarks/results/realsize_cpu_<family>.json; SD1.5's for sdxl)")
    a = ap.parse_args(argv)
    default = "sd" if a.family == "sdxl" else a.family
    path = a.measurements or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                          f"realsize_cpu_{default}.json")
    coef = fit_rows(json.load(open(path))["rows"])
    p = predict(coef, a.family, a.k, a.steps, a.micro_batch, a.height, a.width or a.height, a.precision,
                a.sampler_checkpointing, a.lora_params, a.unet_dtype, runtime_gib=0.5, reward=a.reward,
                algorithm=a.algorithm)
    print(json.dumps({k: round(v, 3) for k, v in p.items()}, indent=2))


if __name__ == "__main__":
    main()
