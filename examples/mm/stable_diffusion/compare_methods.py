"""Compare DRaFT+, DRaFT, DRaFT-LV, AlignProp, DDPO and SDPO on one model and reward, same seeds.

An experiment, not a test. Each method trains through the real CLI (``nemo_aligner_draft.cli.train``)
for about the same number of generated training samples; the held-out reward (validation: fixed
latents, deterministic DDIM, the same prompts for every method) is recorded against the number of
samples generated so far and against the training wall time. Writes to ``--out``:

* ``compare_methods.png``: held-out reward vs generated samples and vs wall time;
* ``compare_methods.md``: a table (final reward, samples to reach DDPO's final reward, wall time);
* ``compare_methods.json``: every curve point.

Model and reward: the embedded pretrained model and its reward when its SD weights are shipped
(``nemo_aligner_draft/embedded/assets/sd/model_index.json``); otherwise a tiny random SD built
offline with the ``brightness`` reward (the run says which). Full fine-tuning, 3 DDIM steps,
micro-batch 4. Learning rates are per method, the ones the tests use: reward-gradient methods 3e-3;
DDPO 3e-4 with clip_range 0.1 (1e-3 made its approx_kl blow up); SDPO 1e-3 with clip_range 0.5
(3e-4 did not move the reward in 30 optimizer steps).

    OMP_NUM_THREADS=1 python examples/mm/stable_diffusion/compare_methods.py --out runs/compare --samples 240
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
EMBEDDED_SD = os.path.join(REPO, "nemo_aligner_draft", "embedded", "assets", "sd")

# name -> (config, loop section, overrides, samples generated per optimizer step, optimizer steps per
# training step); micro-batch 4 everywhere, PPO epochs of 3 sample batches (12 prompts).
PG = ["model.optim.lr=0.0003", "model.{a}.num_sample_batches=3",
      "model.{a}.clip_range=0.1", "model.{a}.timestep_fraction=1.0"]
METHODS = {
    "DRaFT+": ("draftp_tiny", "draftp_sd", ["model.kl_coeff=0.01", "model.truncation_steps=1"], 4, 1),
    "DRaFT": ("draftp_tiny", "draftp_sd", ["model.kl_coeff=0.0", "model.truncation_steps=1"], 4, 1),
    "DRaFT-LV": ("draftp_tiny", "draftp_sd", ["model.kl_coeff=0.0", "model.truncation_steps=1",
                                             "model.lv_copies=2"], 4, 1),
    "AlignProp": ("alignprop_tiny", "alignprop", [], 4, 1),
    "DDPO": ("ddpo_tiny", "ddpo", [o.format(a="ddpo") for o in PG], 4, 3),
    "SDPO": ("sdpo_tiny", "sdpo", ["model.optim.lr=0.001", "model.sdpo.num_sample_batches=3",
                                   "model.sdpo.clip_range=0.5", "model.sdpo.timestep_fraction=1.0",
                                   "model.sdpo.eval_steps=[1]"], 8, 3),
}


def model_and_reward(work: str):
    if os.path.isfile(os.path.join(EMBEDDED_SD, "model_index.json")):
        return EMBEDDED_SD, ["rm.name=embedded_clip_score",
                             "model.data.train.dataset_path=builtin:embedded_train",
                             "model.data.validation.dataset_path=builtin:embedded_heldout"], "embedded model + embedded_clip_score"
    from nemo_aligner_draft.testing.tiny import save_tiny_sd

    sd = os.path.join(work, "tiny_sd")
    if not os.path.isfile(os.path.join(sd, "model_index.json")):
        save_tiny_sd(sd)
    return sd, ["rm.name=brightness", "model.data.train.dataset_path=builtin:animals",
                "model.data.validation.dataset_path=builtin:animals"], \
        "tiny random SD (embedded SD weights not shipped) + brightness"


def run_method(name, sd, common, out, samples, val_points, limit_val):
    from nemo_aligner_draft.cli.train import main

    cfg, loop, extra, per_opt_step, opt_per_train = METHODS[name]
    opt_steps = max(samples // per_opt_step, opt_per_train)
    opt_steps -= opt_steps % opt_per_train
    train_steps = opt_steps // opt_per_train
    val_every = max(train_steps // val_points, 1)
    run_dir = os.path.join(out, "runs", name)
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [f"--config-name={cfg}", f"model.pretrained={sd}", f"exp_manager.explicit_log_dir={run_dir}",
            f"trainer.max_steps={opt_steps}", f"trainer.{loop}.max_steps={opt_steps}",
            f"trainer.{loop}.val_check_interval={val_every}", f"trainer.{loop}.save_interval={opt_steps}",
            f"trainer.{loop}.limit_val_batches={limit_val}", "model.peft.peft_scheme=none",
            "exp_manager.create_tensorboard_logger=false", "model.infer.inference_steps=3",
            "model.decode_target=x0", *common, *extra]
    if cfg in ("draftp_tiny", "alignprop_tiny"):
        args.append("model.optim.lr=0.003")
    t0 = time.perf_counter()
    rc = main(args)
    total = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{name}: training exited with {rc}")
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    train = metrics["train"]
    # training wall time up to each step (validation and start-up excluded)
    clock, elapsed = {}, 0.0
    for h in train:
        # one history entry per training step: DRaFT/AlignProp log that step's step_time, DDPO/SDPO
        # the PPO epoch's elapsed time (sampling + all its optimizer steps)
        st = h.get("epoch_time", h.get("step_time", float("nan")))
        elapsed += 0.0 if math.isnan(st) else st
        clock[h["step"]] = elapsed
    points = [{"step": 0, "samples": 0, "wall_s": 0.0, "reward": metrics["validation"][0]["reward_base"]}]
    for v in metrics["validation"]:
        step = v["step"]
        points.append({"step": step, "samples": step * per_opt_step, "wall_s": clock.get(step, elapsed),
                       "reward": v["reward_tuned"]})
    return {"points": points, "total_s": total, "opt_steps": opt_steps}


def samples_to_reach(points, target):
    for p in points:
        if p["reward"] >= target:
            return p["samples"]
    return None


def main_cli(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/compare_methods")
    p.add_argument("--samples", type=int, default=240, help="training samples each method generates")
    p.add_argument("--val-points", type=int, default=4, help="validations per run")
    p.add_argument("--limit-val-batches", type=int, default=3, help="validation micro-batches of 4 prompts")
    p.add_argument("--methods", default=",".join(METHODS))
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    sd, common, setting = model_and_reward(args.out)
    print(f"setting: {setting}")
    results = {}
    for name in args.methods.split(","):
        results[name] = run_method(name, sd, common, args.out, args.samples, args.val_points, args.limit_val_batches)
        print(name, results[name]["points"][-1])
    target = results["DDPO"]["points"][-1]["reward"] if "DDPO" in results else None
    rows = []
    for name, r in results.items():
        pts = r["points"]
        need = samples_to_reach(pts, target) if target is not None else None
        rows.append({"method": name, "base": pts[0]["reward"], "final": pts[-1]["reward"],
                     "gain": pts[-1]["reward"] - pts[0]["reward"], "samples": pts[-1]["samples"],
                     "samples_to_ddpo_final": need, "train_wall_s": pts[-1]["wall_s"], "run_s": r["total_s"]})
    with open(os.path.join(args.out, "compare_methods.json"), "w") as f:
        json.dump({"setting": setting, "args": vars(args), "results": results, "table": rows}, f, indent=1)
    lines = [(f"Setting: {setting}; {args.samples} training samples per method, held-out reward on "
              f"{4 * args.limit_val_batches} prompts (fixed latents)."), "",
             ("| method | base reward | final reward | gain | samples generated | samples to reach DDPO's final | "
              "train wall time (s) |"), "|---|---|---|---|---|---|---|"]
    for r in rows:
        need = "not reached" if r["samples_to_ddpo_final"] is None else str(r["samples_to_ddpo_final"])
        lines.append(f"| {r['method']} | {r['base']:.4f} | {r['final']:.4f} | {r['gain']:+.4f} | {r['samples']} | "
                     f"{need} | {r['train_wall_s']:.1f} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "compare_methods.md"), "w") as f:
        f.write(table)
    plot(results, os.path.join(args.out, "compare_methods.png"), setting)
    print(table)
    return 0


def plot(results, path, setting):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        pts = r["points"]
        axes[0].plot([q["samples"] for q in pts], [q["reward"] for q in pts], "o-", label=name)
        axes[1].plot([q["wall_s"] for q in pts], [q["reward"] for q in pts], "o-", label=name)
    axes[0].set_xlabel("training samples generated")
    axes[1].set_xlabel("training wall time (s, 1 CPU thread)")
    for ax in axes:
        ax.set_ylabel("held-out reward")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(setting, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    sys.exit(main_cli())
