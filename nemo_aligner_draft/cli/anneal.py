"""Annealed importance guidance from a training config: NeMo-Aligner's ``anneal_sdxl.py``, same command line.

    torchrun --nproc_per_node=8 examples/mm/stable_diffusion/anneal_sdxl.py --config-path=<conf> \
        --config-name=draftp_sdxl ... exp_manager.explicit_log_dir=<run> +prompt="a cat" \
        +weight_type='draft,base,power_2.0'

The model is built exactly as training builds it (``model.pretrained``, or NeMo-Aligner's parts), and the
fine-tuned adapters come from the newest checkpoint of the run directory
(``exp_manager.explicit_log_dir``; none there: the untrained adapters, i.e. the base model). For each
weight type — ``base``, ``draft``, ``linear``, ``power_<p>``, ``step_<f>`` (NeMo-Aligner's names; default
all six of NeMo-Aligner's list) — every prompt (``prompt``, else the validation prompts) is drawn with
ε_i = (1 − w_i) ε_base + w_i ε_fine-tuned, w_i from NeMo-Aligner's progress i / T
(:func:`..core.aig.aig_weights` with ``endpoint=False``), and written as NeMo-Aligner writes it:
``<run>/annealed_outputs_sdxl_<type>/img_<i>_<rank>.png`` and ``prompt_<i>_<rank>.txt``.
"""
from __future__ import annotations

import glob
import logging
import os
import sys
from typing import List, Optional

from ..errors import InputError, attributed, report

log = logging.getLogger("nemo_aligner_draft")

NEMO_WEIGHT_TYPES = ["base", "draft", "linear", "power_2", "power_4", "step_0.6"]


def weight_types(value) -> List[str]:
    if value is None:
        return list(NEMO_WEIGHT_TYPES)
    types = [t.strip() for t in (value.split(",") if isinstance(value, str) else value) if t.strip()]
    from ..core.aig import aig_weights

    for t in types:
        with attributed("weight_type"):
            aig_weights(2, t)
    return types


def newest_checkpoint(run_dir: Optional[str]) -> Optional[str]:
    if not run_dir:
        return None
    found = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "*.ckpt")), key=os.path.getmtime)
    lasts = [p for p in found if p.endswith("last.ckpt")]
    return (lasts or found or [None])[-1]


def run(cfg, dict_cfg) -> List[str]:
    """Draw every weight type's images; returns the output directories."""
    import torch
    from omegaconf import OmegaConf
    from PIL import Image

    from ..core.aig import AIGDenoiser, aig_weights
    from ..core.sampler import StepPlan, sample
    from ..files import atomic_save_image, atomic_write_text, safe_torch_load
    from ..models.base import AlignmentModel, seeded_generator
    from . import train

    inputs = train.preflight(cfg)
    types = weight_types(cfg.weight_type)
    source = inputs["val"] if inputs["val"] is not None else inputs["train"]
    prompts = [cfg.prompt] if cfg.prompt is not None else \
        list(source[: max(cfg.loop.limit_val_batches, 1) * cfg.model.micro_batch_size])
    with attributed("model"):
        model = AlignmentModel(cfg=OmegaConf.create(OmegaConf.to_container(dict_cfg.model, resolve=True)),
                               config=cfg.model, loop=cfg.loop, reward=inputs["reward"], train_prompts=inputs["train"],
                               val_prompts=inputs["val"], precision=cfg.trainer.precision)
    ckpt = newest_checkpoint(cfg.exp_manager.explicit_log_dir) if cfg.exp_manager.resume_if_exists else None
    if ckpt is not None:
        state = safe_torch_load(ckpt)
        model.on_load_checkpoint(state)
        model.load_state_dict(state["state_dict"], strict=False)
        log.info(f"fine-tuned weights: {ckpt}")
    else:
        log.info("no checkpoint in the run directory: the fine-tuned model is the base model")
    model.eval()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    mine = prompts[rank::world] if cfg.prompt is None else prompts
    inf = model.mcfg.infer
    out_dirs = []
    run_dir = cfg.exp_manager.explicit_log_dir or train.planned_log_dir(cfg)
    for wt in types:
        out_dir = os.path.join(run_dir, f"annealed_outputs_sdxl_{wt}")
        os.makedirs(out_dir, exist_ok=True)
        index = 0
        for start in range(0, len(mine), cfg.model.micro_batch_size):
            batch = mine[start:start + cfg.model.micro_batch_size]
            cond = model.encode(batch)  # sets the resolution the rule may depend on
            rule = model.step_rule()
            # the same initial noise for every weight type, so the types differ only by the mix
            g = seeded_generator(cfg.model.seed, "anneal", rank, start)
            latents = model.backend.initial_latents(len(batch), inf.height, inf.width, rule, generator=g)
            w = inf.unconditional_guidance_scale
            den = AIGDenoiser(model.backend.reference_denoiser(cond, w), model.backend.denoiser(cond, w), rule,
                              weights=aig_weights(rule.num_steps, wt, endpoint=False))
            with torch.no_grad():
                images = model.decode(sample(den, rule, latents, StepPlan.no_grad(rule.num_steps)).latents)
            for img, prompt in zip(images, batch):
                arr = (img.clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
                atomic_save_image(Image.fromarray(arr), os.path.join(out_dir, f"img_{index:05d}_{rank:02d}.png"))
                atomic_write_text(os.path.join(out_dir, f"prompt_{index:05d}_{rank:02d}.txt"), prompt)
                index += 1
        log.info(f"{wt}: {index} images in {out_dir}")
        out_dirs.append(out_dir)
    return out_dirs


def main(argv: Optional[List[str]] = None, default_config: str = "draftp_sdxl") -> int:
    from ..config import load_config
    from . import train

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = train.parse_args(argv, default_config)
    try:
        dict_cfg = train.compose(args.config_path, args.config_name, args.overrides)
        cfg = train._validated(load_config, dict_cfg)
        for key, reason in cfg.notices_given:
            log.info(f"notice: {key}: no effect here ({reason})")
        out = run(cfg, dict_cfg)
    except InputError as e:
        return report(e)
    print("annealed outputs: " + ", ".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
