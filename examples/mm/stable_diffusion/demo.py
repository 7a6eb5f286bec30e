"""`make demo`: DRaFT+ on the embedded tiny model, end to end on a CPU in minutes.

Writes into --out: reward_curve.png (named axes and legend), before_after.png (the final validation:
bands of 16 numbered held-out prompts, base row above fine-tuned row, same latents, each image's reward
and the change under it, the prompt list under each band), lora/pytorch_lora_weights.safetensors,
summary.json, and the full run directory (TensorBoard events, checkpoints, .nemo) under run/.

Uses the pretrained embedded model when the package ships it (nemo_aligner_draft/embedded/assets/sd);
otherwise it builds a tiny randomly initialised SD pipeline and trains it on a simple built-in reward.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import time

import torch

torch.set_num_threads(1)


def embedded_sd_dir():
    from nemo_aligner_draft import embedded

    path = os.path.join(os.path.dirname(embedded.__file__), "assets", "sd")
    return path if os.path.isfile(os.path.join(path, "model_index.json")) else None


# TrainingReport saves each validation with image_grid's default width of 16 images per band
GRID_COLS = 16


def write_figures(run_dir: str, out: str) -> dict:
    """before_after.png and reward_curve.png in ``out`` from a finished run directory alone (metrics.json,
    config.yaml, images/val_step*.png): nothing is re-rendered, so the figures show what the run logged.
    Returns {"before_after": path, "reward_curve": path}."""
    import yaml
    from PIL import Image

    from nemo_aligner_draft.metrics.figures import labelled_comparison, method_name, reward_curve, signed, split_grid

    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    cfg = {}
    if os.path.isfile(os.path.join(run_dir, "config.yaml")):
        with open(os.path.join(run_dir, "config.yaml")) as f:
            cfg = yaml.safe_load(f) or {}
    method = method_name(cfg.get("model") or {})
    reward = (cfg.get("rm") or {}).get("name") or "reward"
    val = metrics["validation"][-1]
    grid_path = os.path.join(run_dir, "images", f"val_step{val['step']:06d}.png")
    if not os.path.isfile(grid_path):  # a grid named otherwise (older run): the last one is the final validation
        grid_path = os.path.join(run_dir, "images", sorted(os.listdir(os.path.join(run_dir, "images")))[-1])
    n = len(val["prompts"])
    with Image.open(grid_path) as im:
        base, tuned = split_grid(im.convert("RGB"), n, n_rows=2, cols=GRID_COLS)
    gain = val["reward_tuned"] - val["reward_base"]
    se = val.get("gain_standard_error")
    title = (f"{method} vs base model on {n} held-out prompts, reward {reward} (higher is better), step {val['step']}\n"
             f"mean reward: base {val['reward_base']:.2f} \u2192 {method} {val['reward_tuned']:.2f};  "
             f"paired gain {signed(gain)}" + (f" \u00b1 {se:.2f} (SE)" if se is not None else "")
             + (f";  {val['images_improved']} of {n} images improved" if "images_improved" in val else ""))
    subtitle = (f"Each band: the upper row is the base model, the lower row {method} fine-tuned, the same prompt and "
                f"initial noise in each column; the numbered prompts are listed under the band.\n"
                f"Under each image its reward; under the {method} image also the change from base "
                f"(green: higher, red: lower).")
    paths = {"before_after": os.path.join(out, "before_after.png"),
             "reward_curve": os.path.join(out, "reward_curve.png")}
    labelled_comparison(base, tuned, val["prompts"], val["rewards_base"], val["rewards_tuned"], paths["before_after"],
                        title, row_names=("base", f"{method}\nfine-tuned"), cols=GRID_COLS, subtitle=subtitle)
    reward_curve(metrics["train"], metrics["validation"], paths["reward_curve"], reward, method=method, heldout=n)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="demo_out")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="model.seed (default: the config's, 1234)")
    args = p.parse_args(argv)
    from nemo_aligner_draft.cli.train import main as train_main

    out = os.path.abspath(args.out)
    run_dir = os.path.join(out, "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    sd = embedded_sd_dir()
    if sd is not None:
        config = "draftp_embedded"
        overrides = [f"model.pretrained={sd}"]
        what = "embedded tiny text-to-image model, reward embedded_clip_score"
    else:
        from nemo_aligner_draft.testing.tiny import save_tiny_sd

        sd = os.path.join(out, "tiny_sd")
        if not os.path.isfile(os.path.join(sd, "model_index.json")):
            save_tiny_sd(sd)
        config = "draftp_tiny"
        # LoRA has little leverage on a random UNet: the fallback fine-tunes the whole (0.8 M) UNet
        overrides = [f"model.pretrained={sd}", "model.truncation_steps=3", "model.optim.lr=0.003",
                     "model.peft.peft_scheme=none", "model.kl_coeff=0.01"]
        what = "tiny randomly initialised SD (no embedded weights found), reward colorfulness, full fine-tuning"
    if args.steps:
        overrides += [f"trainer.max_steps={args.steps}", f"trainer.draftp_sd.max_steps={args.steps}"]
    if args.seed is not None:
        overrides.append(f"model.seed={args.seed}")
    print(f"DRaFT+ demo on the {what}")
    t0 = time.time()
    rc = train_main([f"--config-name={config}", f"exp_manager.explicit_log_dir={run_dir}",
                     "exp_manager.resume_if_exists=false", *overrides])
    if rc:
        return rc
    wall = time.time() - t0
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    val = metrics["validation"]
    step_times = [h["step_time"] for h in metrics["train"][1:] if h.get("step_time") == h.get("step_time")]
    pictures = write_figures(run_dir, out)
    shutil.rmtree(os.path.join(out, "lora"), ignore_errors=True)
    if os.path.isdir(os.path.join(run_dir, "export")):
        shutil.copytree(os.path.join(run_dir, "export"), os.path.join(out, "lora"))
    summary = {
        "model": what,
        "steps": metrics["train"][-1]["step"],
        "heldout_reward_before": val[-1]["reward_base"],
        "heldout_reward_after": val[-1]["reward_tuned"],
        "heldout_prompts": len(val[-1]["prompts"]),
        # paired per-image differences, same latents: tuned − base
        "heldout_gain_mean": val[-1]["reward_tuned"] - val[-1]["reward_base"],
        "heldout_gain_standard_error": val[-1]["gain_standard_error"],
        "heldout_images_improved": val[-1]["images_improved"],
        "diversity_before": val[-1].get("diversity_base"),
        "diversity_after": val[-1].get("diversity_tuned"),
        "seconds_per_step_median": statistics.median(step_times) if step_times else None,
        "wall_seconds_training": round(wall, 1),
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    wrote = ["reward_curve.png", "before_after.png", "summary.json"] + (["lora/"] if os.path.isdir(os.path.join(out, "lora")) else [])
    print(f"wrote in {out}: {', '.join(wrote)}")
    print("pictures:")
    for path in pictures.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
