"""Inference: images from a diffusers pipeline directory, optionally with a LoRA, a LoRA soup, or
annealed importance guidance (AIG) between the base and the fine-tuned model.

    nad-generate --model /models/sd15 --lora runs/draftp/export --prompt "a cat" --seed 0 --out out/

Writes ``out/images/NNNNN.png``, ``out/grid.png`` and ``out/generation.json`` (settings, and per
image its prompt, seed and reward when ``--reward`` is given). Image i is drawn from the initial
noise of seed ``--seed + i`` whatever the batch size, so results do not depend on ``--batch``.

The fine-tuned model is the base UNet plus one peft adapter:
* ``--lora P --lora-scale s``: ΔW = s·(alpha/r)·B A;
* ``--soup-lora A B --soup-alpha a``: ΔW = a·ΔW_A + (1 − a)·ΔW_B (core/soup.py, ``delta`` mode,
  exact via rank stacking), times ``--lora-scale``; ``--soup-mode factors`` interpolates the factors
  instead (AlignProp's mixing); B may be ``base``, the base model (AlignProp's ``stablediffusion``);
* ``--aig SCHEDULE`` (linear | power_<p> | step_<f> | constant_<c>): at step i the sampler uses
  (1 − w_i)·ε_base + w_i·ε_ft (core/aig.py), base = adapter switched off.

From a config instead of flags (AlignProp's ``evaluate`` / ``evaluate_soup`` recipes)::

    nad-generate --config-name alignprop_evaluate model.pretrained=/models/sd15 ... --lora L --out out/

composes ``conf/<name>.yaml`` (``--config-path``) with Hydra overrides and validates it as training does;
it then renders what training's validation renders: ``trainer.<loop>.limit_val_batches`` batches of
``model.micro_batch_size`` images of the validation prompts (``model.data.validation.dataset_path``, else
the train prompts; repeated when there are fewer), with ``model.seed``, ``model.infer`` (steps, guidance,
size, sampler), ``model.family``, the reward ``rm`` and the soup's ``soup.alpha`` / ``soup.mode``. The
flags those keys replace are refused with it.
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


# flag -> (the config key that replaces it with --config-name, the flag's default without a config)
CONFIG_FLAGS = {"model": ("model.pretrained", None), "family": ("model.family", "auto"),
                "prompt": ("model.data.validation.dataset_path", None),
                "prompt_file": ("model.data.validation.dataset_path", None),
                "num_images_per_prompt": ("trainer.<loop>.limit_val_batches", 1), "seed": ("model.seed", 0),
                "steps": ("model.infer.inference_steps", 25), "cfg": ("model.infer.unconditional_guidance_scale", 7.5),
                "sampler": ("model.infer.sampler", None), "batch": ("model.micro_batch_size", 4),
                "height": ("model.infer.height", 512), "width": ("model.infer.width", 512),
                "soup_alpha": ("soup.alpha", 0.5), "soup_mode": ("soup.mode", "delta"),
                "reward": ("rm.name", None), "reward_path": ("rm.model.restore_from_path", None)}
SOUP_BASE = "base"  # --soup-lora A base: mix A with the base model


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nad-generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config-name", "-cn", default=None,
                   help="take the model, sampler, prompts, reward and soup settings from this config (conf/<name>.yaml)")
    p.add_argument("--config-path", "-cp", default=None, help="directory of --config-name (default: the package's conf/)")
    p.add_argument("overrides", nargs="*", help="with --config-name: Hydra overrides, key=value")
    p.add_argument("--model", help="local diffusers pipeline directory (model_index.json)")
    from ..backends.registry import FAMILIES

    p.add_argument("--family", choices=["auto", *FAMILIES])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", nargs="+", help="one or more prompts")
    src.add_argument("--prompt-file", help="text file, one prompt per line (blank lines and # comments skipped)")
    p.add_argument("--num-images-per-prompt", type=int)
    p.add_argument("--seed", type=int, help="image i uses seed + i (default 0)")
    p.add_argument("--steps", type=int, help="sampler steps (default 25)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (1 = off; default 7.5); FLUX.1-dev: "
                                             "the value of its guidance embedding")
    p.add_argument("--sampler", help="ddim | euler | flow (default: the family's; flow for sd3 and flux)")
    p.add_argument("--batch", type=int, help="images per batch (default 4)")
    p.add_argument("--height", type=int, help="default 512")
    p.add_argument("--width", type=int, help="default 512")
    lo = p.add_mutually_exclusive_group()
    lo.add_argument("--lora", help="LoRA safetensors (or its directory) in the diffusers format")
    lo.add_argument("--soup-lora", nargs=2, metavar=("A", "B"), help=f"two LoRAs to mix (B = {SOUP_BASE}: the base model)")
    p.add_argument("--soup-alpha", type=float, help="weight of the first soup LoRA (default 0.5)")
    p.add_argument("--soup-mode", choices=["delta", "factors"], help="delta (default): ΔW mixed linearly; factors: "
                                                                    "A and B interpolated (AlignProp)")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--aig", default=None, help="annealed importance guidance schedule between base and LoRA")
    p.add_argument("--reward", default=None, help="reward name (rewards registry) to score the images")
    p.add_argument("--reward-path", default=None, help="local weights of the reward")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_intermixed_args(argv)
    if args.config_name:
        given = [name for name in CONFIG_FLAGS if getattr(args, name) is not None]
        if given:
            name = given[0]
            p.error(f"--{name.replace('_', '-')} is set by --config-name (its {CONFIG_FLAGS[name][0]}): "
                    f"give it as an override, key=value")
    else:
        if args.overrides:
            p.error(f"unrecognized arguments: {' '.join(args.overrides)} (key=value overrides need --config-name)")
        if args.model is None:
            p.error("the following arguments are required: --model (or --config-name)")
        if args.prompt is None and args.prompt_file is None:
            p.error("one of the arguments --prompt --prompt-file is required (or --config-name)")
        for name, (_, default) in CONFIG_FLAGS.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
    if args.aig and not (args.lora or args.soup_lora):
        p.error("--aig needs a fine-tuned model: give --lora or --soup-lora")
    if args.soup_lora and args.soup_lora[0] == SOUP_BASE:
        p.error(f"--soup-lora: the first LoRA must be a file ({SOUP_BASE!r} is allowed as the second)")
    if not args.config_name:
        for name in ("steps", "batch", "num_images_per_prompt", "height", "width"):
            if getattr(args, name) < 1:
                p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.soup_lora and not 0.0 <= args.soup_alpha <= 1.0:
            p.error(f"--soup-alpha must be in [0, 1], got {args.soup_alpha}")
    return args


def apply_config(args) -> argparse.Namespace:
    """Fill the settings ``--config-name`` replaces from the validated config (see the module docstring).
    Every problem is an :class:`InputError` of the config key (or override) that caused it."""
    from ..config import load_config
    from ..data.source import open_prompt_source
    from . import train

    dict_cfg = train.compose(args.config_path or train.REPO_CONF, args.config_name, args.overrides)
    cfg = train._validated(load_config, dict_cfg)
    m, inf = cfg.model, cfg.model.infer
    if m.from_nemo_parts:
        raise InputError("model.unet_config.from_pretrained", "nad-generate loads a diffusers pipeline: set "
                                                               "model.pretrained instead of NeMo-Aligner's parts")
    val = m.data.validation.dataset_path
    key = "model.data.validation.dataset_path" if val else "model.data.train.dataset_path"
    path = val or m.data.train.dataset_path
    count = max(cfg.loop.limit_val_batches, 1) * m.micro_batch_size
    with attributed(key, "prompts", path):
        source = list(open_prompt_source(path, key, m.data.max_prompt_chars)[:count])
    args.model, args.family, args.seed, args.batch = m.pretrained, m.family, m.seed, m.micro_batch_size
    args.steps, args.cfg = inf.inference_steps, inf.unconditional_guidance_scale
    args.height, args.width = inf.height, inf.width
    args.sampler = None if inf.sampler == "default" else inf.sampler
    args.prompt, args.num_images_per_prompt = [source[i % len(source)] for i in range(count)], 1
    args.soup_alpha, args.soup_mode = cfg.soup.alpha, cfg.soup.mode
    args.reward, args.reward_path = cfg.rm.reward_name, cfg.rm.model.restore_from_path
    args._rm = cfg.rm  # built as training builds it (rm.fp32, rm.kwargs, weighted_sum components)
    args.name = cfg.name  # recorded with the other settings in generation.json
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


def attach_finetuned(unet, args, prefix: Optional[str] = None) -> Optional[dict]:
    """Add the fine-tuned adapter (LoRA or soup) to ``unet`` (the family's denoising network, whose LoRA
    files carry ``prefix``: unet or transformer); returns a description or None."""
    from ..core.soup import soup_lora
    from ..export.lora_io import apply_lora, lora_scale, read_lora

    if args.lora:
        state, cfg = read_lora(args.lora, prefix)
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
        lora_scale(cfg)  # refuses per-module patterns
        desc = {"lora": os.path.abspath(args.lora), "rank": r, "alpha": alpha}
    elif args.soup_lora:
        s1, c1 = read_lora(args.soup_lora[0], prefix)
        with_base = args.soup_lora[1] == SOUP_BASE
        s2, c2 = (None, c1) if with_base else read_lora(args.soup_lora[1], prefix)
        state = soup_lora(s1, s2, args.soup_alpha, args.soup_mode, lora_scale(c1), lora_scale(c2))
        if args.soup_mode == "delta" and not with_base:
            # delta-mode soups of two adapters stack the ranks and fold the scales into B: load with scaling 1
            r = int(c1["r"]) + int(c2["r"])
            alpha = float(r)
        else:  # the first adapter's ranks and scale
            r, alpha = int(c1["r"]), float(c1["lora_alpha"])
        desc = {"soup": [x if x == SOUP_BASE else os.path.abspath(x) for x in args.soup_lora],
                "soup_alpha": args.soup_alpha, "soup_mode": args.soup_mode}
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
    from ..backends.registry import family_of
    from ..core.aig import AIGDenoiser
    from ..core.sampler import StepPlan, sample

    if args.config_name and not hasattr(args, "_rm"):
        apply_config(args)
    with attributed("--prompt-file", "prompts", args.prompt_file):
        prompts = read_prompts(args)
    with attributed("model.pretrained" if args.config_name else "--model", "a diffusers pipeline", args.model):
        backend = load_backend(args.model, args.family)
    with attributed("--device"):
        backend.to(args.device)
    lora_flag = "--lora" if args.lora else "--soup-lora"
    with attributed(lora_flag, "a LoRA", args.lora or args.soup_lora):
        finetuned = attach_finetuned(backend.net, args, getattr(family_of(backend), "denoiser_subfolder", "unet"))
    if finetuned is not None:
        backend.net.to(args.device)
    if args.aig:
        backend.setup_reference(use_adapters=True)
    reward = None
    if getattr(args, "_rm", None) is not None:
        from .train import build_reward_from_config

        reward = build_reward_from_config(args._rm).to(args.device).eval()
    elif args.reward:
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
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
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
