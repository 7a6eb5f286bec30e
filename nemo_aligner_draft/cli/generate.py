"""Inference: images from a diffusers pipeline directory, optionally with a LoRA, a LoRA soup, or
annealed importance guidance (AIG) between the base and the fine-tuned model.

    nad-generate --model /models/sd15 --lora runs/draftp/export --prompt "a cat" --seed 0 --out out/

Writes ``out/images/NNNNN.png``, ``out/grid.png`` and ``out/generation.json`` (settings, and per
image its prompt, seed and reward when ``--reward`` is given). Image i is drawn from the initial
noise of seed ``--seed + i`` whatever the batch size, so results do not depend on ``--batch``.

The fine-tuned model is the base UNet plus one peft adapter:
* ``--lora P --lora-scale s``: ΔW = s·(alpha/r)·B A;
* ``--soup-lora A B --soup-alpha a``: ΔW = a·ΔW_A + (1 − a)·ΔW_B (core/soup.py, ``delta`` mode,
  exact via rank stacking), times ``--lora-scale``;
* ``--aig SCHEDULE`` (linear | power_<p> | step_<f> | constant_<c>): at step i the sampler uses
  (1 − w_i)·ε_base + w_i·ε_ft (core/aig.py), base = adapter switched off.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from typing import List, Optional

import torch

from ..errors import InputError, attributed, report
from ..files import atomic_write_json

log = logging.getLogger("nad-generate")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nad-generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local diffusers pipeline directory (model_index.json)")
    p.add_argument("--family", default="auto", choices=["auto", "sd", "sdxl"])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", nargs="+", help="one or more prompts")
    src.add_argument("--prompt-file", help="text file, one prompt per line (blank lines and # comments skipped)")
    p.add_argument("--num-images-per-prompt", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--sampler", default=None, help="ddim | euler (default: the family's)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    lo = p.add_mutually_exclusive_group()
    lo.add_argument("--lora", help="LoRA safetensors (or its directory) in the diffusers format")
    lo.add_argument("--soup-lora", nargs=2, metavar=("A", "B"), help="two LoRAs to mix")
    p.add_argument("--soup-alpha", type=float, default=0.5, help="weight of the first soup LoRA")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--aig", default=None, help="annealed importance guidance schedule between base and LoRA")
    p.add_argument("--reward", default=None, help="reward name (rewards registry) to score the images")
    p.add_argument("--reward-path", default=None, help="local weights of the reward")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.aig and not (args.lora or args.soup_lora):
        p.error("--aig needs a fine-tuned model: give --lora or --soup-lora")
    for name in ("steps", "batch", "num_images_per_prompt", "height", "width"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.soup_lora and not 0.0 <= args.soup_alpha <= 1.0:
        p.error(f"--soup-alpha must be in [0, 1], got {args.soup_alpha}")
    return args


def read_prompts(args) -> List[str]:
    if args.prompt:
        prompts = list(args.prompt)
    else:
        if not os.path.isfile(args.prompt_file):
            raise InputError("--prompt-file", f"{args.prompt_file!r} does not exist")
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        if not prompts:
            raise InputError("--prompt-file", f"{args.prompt_file!r} holds no prompts")
    return [p for p in prompts for _ in range(args.num_images_per_prompt)]


def attach_finetuned(unet, args) -> Optional[dict]:
    """Add the fine-tuned adapter (LoRA or soup) to ``unet``; returns a description or None."""
    from ..core.soup import soup_lora
    from ..export.lora_io import apply_lora, lora_scale, read_lora

    if args.lora:
        state, cfg = read_lora(args.lora)
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
        lora_scale(cfg)  # refuses per-module patterns
        desc = {"lora": os.path.abspath(args.lora), "rank": r, "alpha": alpha}
    elif args.soup_lora:
        (s1, c1), (s2, c2) = read_lora(args.soup_lora[0]), read_lora(args.soup_lora[1])
        state = soup_lora(s1, s2, args.soup_alpha, "delta", lora_scale(c1), lora_scale(c2))
        # delta-mode soups stack the ranks and fold the scales into B: load with scaling 1
        r = int(c1["r"]) + int(c2["r"])
        alpha = float(r)
        desc = {"soup": [os.path.abspath(x) for x in args.soup_lora], "soup_alpha": args.soup_alpha,
                "soup_mode": "delta"}
    else:
        return None
    if args.lora_scale != 1.0:  # ΔW is linear in B
        state = {k: (v * args.lora_scale if ".lora_B." in k else v) for k, v in state.items()}
    apply_lora(unet, state, r, alpha, adapter_name="finetuned")
    desc["lora_scale"] = args.lora_scale
    return desc


def make_grid(images: torch.Tensor):
    """[N, 3, H, W] in [0, 1] → one PIL image, ceil(sqrt(N)) columns."""
    from PIL import Image

    n, _, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, img in enumerate(images):
        grid.paste(to_pil(img), ((i % cols) * w, (i // cols) * h))
    return grid


def to_pil(img: torch.Tensor):
    from PIL import Image

    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def generate(args) -> dict:
    """Run the whole CLI; returns ``{"images": [N,3,H,W] float, "rewards": [N] or None, "record": dict}``."""
    from tqdm import tqdm

    from ..backends import load_backend
    from ..core.aig import AIGDenoiser
    from ..core.sampler import StepPlan, sample

    with attributed("--prompt-file", "prompts", args.prompt_file):
        prompts = read_prompts(args)
    with attributed("--model", "a diffusers pipeline", args.model):
        backend = load_backend(args.model, args.family)
    with attributed("--device"):
        backend.to(args.device)
    lora_flag = "--lora" if args.lora else "--soup-lora"
    with attributed(lora_flag, "a LoRA", args.lora or args.soup_lora):
        finetuned = attach_finetuned(backend.net, args)
    if finetuned is not None:
        backend.net.to(args.device)
    if args.aig:
        backend.setup_reference(use_adapters=True)
    reward = None
    if args.reward:
        from ..rewards import build_reward

        with attributed("--reward-path" if args.reward_path else "--reward", "the reward", args.reward_path):
            reward = build_reward(args.reward, args.reward_path).to(args.device).eval()
    if hasattr(backend, "set_resolution"):
        backend.set_resolution(args.height, args.width)
    rule = backend.step_rule(args.steps, args.sampler)
    images, rewards = [], []
    batches = range(0, len(prompts), args.batch)
    for start in tqdm(batches, desc="batches", unit="batch", disable=None):
        chunk = prompts[start:start + args.batch]
        cond = backend.encode_prompts(chunk)
        latents = torch.cat([backend.initial_latents(1, args.height, args.width, rule,
                                                     generator=torch.Generator().manual_seed(args.seed + start + j))
                             for j in range(len(chunk))])
        den = backend.denoiser(cond, args.cfg)
        if args.aig:
            den = AIGDenoiser(backend.reference_denoiser(cond, args.cfg), den, rule, args.aig)
        with torch.no_grad():
            out = sample(den, rule, latents, StepPlan.no_grad(rule.num_steps), eta=0.0)
            imgs = backend.decode(out.latents).float().cpu()
            if reward is not None:
                rewards.append(reward(imgs.to(args.device), chunk).float().cpu().reshape(-1))
        images.append(imgs)
    images = torch.cat(images)
    scores = torch.cat(rewards) if rewards else None
    record = {
        "settings": {k: v for k, v in vars(args).items()},
        "finetuned": finetuned,
        "aig_weights": None,
        "images": [{"file": f"images/{i:05d}.png", "prompt": p, "seed": args.seed + i,
                    **({"reward": float(scores[i])} if scores is not None else {})}
                   for i, p in enumerate(prompts)],
    }
    if args.aig:
        from ..core.aig import aig_weights

        record["aig_weights"] = aig_weights(args.steps, args.aig).tolist()
    if scores is not None:
        record["reward_mean"] = float(scores.mean())
    with attributed("--out"):
        write_outputs(args.out, images, record)
    return {"images": images, "rewards": scores, "record": record}


def write_outputs(out_dir: str, images: torch.Tensor, record: dict) -> None:
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    for i, img in enumerate(images):
        to_pil(img).save(os.path.join(out_dir, "images", f"{i:05d}.png"))
    make_grid(images).save(os.path.join(out_dir, "grid.png"))
    atomic_write_json(os.path.join(out_dir, "generation.json"), record, indent=2, default=str)


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        generate(args)
    except InputError as e:
        return report(e, "nad-generate")
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
