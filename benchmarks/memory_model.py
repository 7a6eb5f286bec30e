"""A memory model of one DRaFT+ training step: predicted peak memory for (family, K, T, micro-batch,
resolution, precision), the terms it adds, and its check against the CPU full-size measurements.

    peak = runtime + weights(family, reward, dtypes) + LoRA state
           + a_unet · calls · 2B · (H/8)(W/8) · act_bytes     (UNet steps with grad, CFG doubles the batch)
           + a_vae · B · H · W · act_bytes                    (the decoder's saved activations)
           + a_reward · B · act_bytes                         (the reward tower at its own 224 px input)
           + a_bwd · B · H · W · act_bytes                    (backward's transient peak over the forward)

``calls`` is K without sampler checkpointing and 1 with it (each step's graph is rebuilt in backward;
what stays is one latent per step, counted too). The weights are exact (parameter counts of the
published configs, built on the meta device). The four activation coefficients (bytes per element of
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


def param_counts(family: str, reward: str = "pickscore") -> Dict[str, int]:
    """Parameter counts of the family's UNet, VAE decoder, text encoders and the reward backbone."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

    from nemo_aligner_draft.testing import realsize as R

    unet = R.SD15_UNET if family == "sd" else R.SDXL_UNET
    vae = R.SD15_VAE if family == "sd" else R.SDXL_VAE
    texts = [R.SD15_TEXT] if family == "sd" else [R.SDXL_TEXT, R.SDXL_TEXT_2]

    def vae_decoder():
        m = AutoencoderKL(**vae)
        m.encoder = None  # the backend drops the encoder (reward fine-tuning never encodes)
        return m

    spec = R.REWARD_CLIPS[reward]
    return {"unet": _count(lambda: UNet2DConditionModel(**unet)), "vae": _count(vae_decoder),
            "text_encoders": sum(_count(lambda t=t: CLIPTextModel(CLIPTextConfig(**t))) for t in texts),
            "reward": _count(lambda: CLIPModel(CLIPConfig(text_config=spec["text_config"],
                                                          vision_config=spec["vision_config"],
                                                          projection_dim=spec["projection_dim"])))}


def predict(coef: Dict[str, float], family: str, k: int, steps: int, micro_batch: int, height: int, width: int,
            precision: str = "32", sampler_checkpointing: bool = False, lora_params: int = 0,
            unet_dtype: str = "fp32", runtime_gib: float = 0.0, reward: str = "pickscore") -> Dict[str, float]:
    """Predicted peak memory (GiB) and its terms. ``precision``: 32, bf16-mixed or 16-mixed — the frozen
    text encoders, VAE (unless SDXL's force_upcast) and reward are stored at its width; the UNet base
    at ``unet_dtype``."""
    half = not str(precision).startswith("32")
    store = "bf16" if half else "fp32"
    act = 2 if half else 4
    n = param_counts(family, reward)
    vae_dtype = "fp32" if family == "sdxl" else store
    weights = (n["unet"] * BYTES[unet_dtype if half else "fp32"] + n["vae"] * BYTES[vae_dtype]
               + n["text_encoders"] * BYTES[store] + n["reward"] * BYTES[store])
    lora_state = lora_params * 4 * 4  # fp32 weights, grads, Adam's two moments
    latent_px = (height // 8) * (width // 8)
    calls = 1 if sampler_checkpointing else k
    terms = {
        "runtime": runtime_gib * GIB,
        "weights": weights,
        "lora_state": lora_state,
        "unet_steps": coef["unet"] * calls * 2 * micro_batch * latent_px * act
        + (k * micro_batch * 4 * latent_px * 4 if sampler_checkpointing else 0),
        # SDXL's VAE has force_upcast: it decodes in fp32 even under autocast
        "decode": coef["vae"] * micro_batch * height * width * (4 if vae_dtype == "fp32" else act),
        "reward": coef["reward"] * micro_batch * act,
        "backward": coef["bwd"] * micro_batch * height * width * act,
    }
    out = {name: v / GIB for name, v in terms.items()}
    out["predicted_gib"] = sum(out.values())
    return out


def fit(row: Dict) -> Dict[str, float]:
    """Activation coefficients (elements per latent/image pixel) from one measured fp32 CPU row."""
    latent_px = (row["height"] // 8) ** 2
    calls = 1 if row["sampler_checkpointing"] else row["K"]
    added = {name: v * GIB for name, v in row["added_gib"].items()}
    return {"unet": max(added["unet_steps"], 0.0) / (calls * 2 * row["micro_batch"] * latent_px * 4),
            "vae": max(added["decode"], 0.0) / (row["micro_batch"] * row["height"] ** 2 * 4),
            "reward": max(added["reward"], 0.0) / (row["micro_batch"] * 4),
            "bwd": max(added["backward_peak_over_forward"], 0.0) / (row["micro_batch"] * row["height"] ** 2 * 4)}


def _lora_params(row: Dict) -> int:
    return int(round(row["weights_gib"]["lora"] * GIB / 4))


def check_against(rows: List[Dict]) -> Dict:
    """Fit on the first row, predict every row (the first one is then exact by construction up to the
    rounding of its terms); the error is (predicted − measured peak RSS) / measured."""
    first = rows[0]
    coef = fit(first)
    out = []
    for r in rows:
        p = predict(coef, r["family"], r["K"], r["steps"], r["micro_batch"], r["height"], r["height"], "32",
                    r["sampler_checkpointing"], _lora_params(r), runtime_gib=r["rss_gib"]["process_start"],
                    reward=r["reward"])
        measured = r["peak_rss_gib"]
        out.append({"height": r["height"], "K": r["K"], "measured_gib": measured,
                    "predicted_gib": p["predicted_gib"], "error": (p["predicted_gib"] - measured) / measured,
                    "terms_gib": p})
    return {"fitted_on": f"{first['height']} px K={first['K']}", "coefficients": {k: round(v, 2) for k, v in coef.items()},
            "rows": out}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=("sd", "sdxl"), default="sd")
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--precision", default="bf16-mixed")
    ap.add_argument("--sampler-checkpointing", action="store_true")
    ap.add_argument("--unet-dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--lora-params", type=int, default=0)
    ap.add_argument("--measurements", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                            "realsize_cpu_sd.json"),
                    help="the CPU measurements the coefficients are fitted on")
    a = ap.parse_args(argv)
    rows = json.load(open(a.measurements))["rows"]
    coef = fit(rows[0])
    p = predict(coef, a.family, a.k, a.steps, a.micro_batch, a.height, a.width or a.height, a.precision,
                a.sampler_checkpointing, a.lora_params, a.unet_dtype, runtime_gib=0.5)
    print(json.dumps({k: round(v, 3) for k, v in p.items()}, indent=2))


if __name__ == "__main__":
    main()
