"""`make demo`: DRaFT+ on the embedded tiny model, end to end on a CPU in minutes.

Writes into --out: reward_curve.png, before_after.png (bands of 16 held-out prompts: base
row above fine-tuned row, same latents), lora/pytorch_lora_weights.safetensors, summary.json, and the full run
directory (TensorBoard events, checkpoints, .nemo) under run/.

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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="demo_out")
    p.add_argument("--steps", type=int, default=None)
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
    shutil.copy(os.path.join(run_dir, "reward_curve.png"), os.path.join(out, "reward_curve.png"))
    grids = sorted(os.listdir(os.path.join(run_dir, "images")))
    shutil.copy(os.path.join(run_dir, "images", grids[-1]), os.path.join(out, "before_after.png"))
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
