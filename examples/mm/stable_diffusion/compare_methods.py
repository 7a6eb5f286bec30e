"""Compare DRaFT+, DRaFT, DRaFT-LV, AlignProp, DDPO and SDPO on one model and reward, same seeds.

An experiment, not a test. Each method trains through the real CLI (``nemo_aligner_draft.cli.train``)
for about the same number of generated training samples; the held-out reward (validation: fixed
latents, deterministic DDIM, the same prompts for every method) is recorded against the number of
samples generated so far and against the training wall time. Writes to ``--out``:

* ``compare_methods.png``: held-out reward vs generated samples and vs wall time;
* ``compare_methods.md``: a table (final reward, samples to reach DDPO's final reward, wall time);
* ``compare_methods.json``: every curve point.

Model and reward: the embedded pretrained model (``nemo_aligner_draft/embedded/assets/sd``) and
``--reward`` (default ``embedded_clip_score``), trained on the embedded training prompts and validated
on all 96 held-out prompts. Per-method settings: :data:`METHODS` (10 DDIM steps, CFG 3, micro-batches of
8 for every method). ``--seeds`` averages the curves over seeds and lists each seed's gain.

    OMP_NUM_THREADS=1 python examples/mm/stable_diffusion/compare_methods.py --out runs/compare --samples 960
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
# training step). Every method: micro-batches of 8 (so validation batches, and with them the validation
# latents, are the same for all), the pipeline's DDIM with 10 steps, CFG 3, decoding x̂0 of the last step.
# The DRaFT family and AlignProp as `make demo` (LoRA rank 16, lr 2e-3, batches of 32); DDPO LoRA rank 16
# at lr 3e-4 (the DDPO paper's LoRA rate; 1e-3 collapsed the reward) with clip range 0.1, PPO epochs of 4
# sample batches; SDPO full fine-tuning (LoRA did not move its reward in the tests' budget) at lr 3e-5
# (3e-4 collapsed the reward), epochs of 2 batches of pairs.
RANK16 = ["model.peft.lora_tuning.adapter_dim=16", "model.peft.lora_tuning.network_alpha=16"]
PG = ["model.micro_batch_size=8", "model.global_batch_size=8", "model.infer.inference_steps=10",
      "model.decode_target=pred_x0"]
METHODS = {
    "DRaFT+": ("draftp_embedded", "draftp_sd", [], 32, 1),
    "DRaFT": ("draftp_embedded", "draftp_sd", ["model.kl_coeff=0.0"], 32, 1),
    "DRaFT-LV": ("draftp_embedded", "draftp_sd", ["model.kl_coeff=0.0", "model.truncation_steps=1",
                                                 "model.lv_copies=2"], 32, 1),
    "AlignProp": ("alignprop_tiny", "alignprop", ["model.micro_batch_size=8", "model.global_batch_size=32",
                                                  "model.decode_target=pred_x0",
                                                  "model.optim.lr=0.002", *RANK16], 32, 1),
    "DDPO": ("ddpo_tiny", "ddpo", [*PG, *RANK16, "model.optim.lr=0.0003", "model.ddpo.num_sample_batches=4",
                                   "model.ddpo.clip_range=0.1", "model.ddpo.timestep_fraction=1.0"], 8, 4),
    "SDPO": ("sdpo_tiny", "sdpo", [*PG, "model.peft.peft_scheme=none", "model.optim.lr=0.00003",
                                   "model.sdpo.num_sample_batches=2", "model.sdpo.clip_range=0.5",
                                   "model.sdpo.timestep_fraction=1.0", "model.sdpo.eval_steps=[1]"], 16, 2),
}


def model_and_reward(reward: str = "embedded_clip_score"):
    if not os.path.isfile(os.path.join(EMBEDDED_SD, "model_index.json")):
        raise SystemExit(f"{EMBEDDED_SD}: the embedded pipeline is missing (model_index.json); it ships with the "
                         f"package, or rebuild it with examples/mm/stable_diffusion/pretrain_embedded.py")
    return EMBEDDED_SD, [f"rm.name={reward}", "model.data.train.dataset_path=builtin:embedded_train",
                         "model.data.validation.dataset_path=builtin:embedded_heldout"], f"embedded model + {reward}"


def run_method(name, sd, common, out, samples, val_points, limit_val, seed=1234):
    from nemo_aligner_draft.cli.train import main

    cfg, loop, extra, per_opt_step, opt_per_train = METHODS[name]
    opt_steps = max(samples // per_opt_step, opt_per_train)
    opt_steps -= opt_steps % opt_per_train
    train_steps = opt_steps // opt_per_train
    val_every = max(train_steps // val_points, 1)
    run_dir = os.path.join(out, "runs", f"{name}_seed{seed}")
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [f"--config-name={cfg}", f"model.pretrained={sd}", f"exp_manager.explicit_log_dir={run_dir}",
            f"trainer.max_steps={opt_steps}", f"trainer.{loop}.max_steps={opt_steps}",
            f"trainer.{loop}.val_check_interval={val_every}", f"trainer.{loop}.save_interval={opt_steps}",
            f"trainer.{loop}.limit_val_batches={limit_val}", "exp_manager.create_tensorboard_logger=false",
            f"model.seed={seed}", *common, *extra]
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


def average_over_seeds(runs):
    """Mean curve over seeds (every seed validates at the same steps); keeps each seed's final reward."""
    n = len(runs)
    points = [{"step": p0["step"], "samples": p0["samples"],
               "wall_s": sum(r["points"][i]["wall_s"] for r in runs) / n,
               "reward": sum(r["points"][i]["reward"] for r in runs) / n}
              for i, p0 in enumerate(runs[0]["points"])]
    return {"points": points, "total_s": sum(r["total_s"] for r in runs) / n, "opt_steps": runs[0]["opt_steps"],
            "final_per_seed": [r["points"][-1]["reward"] - r["points"][0]["reward"] for r in runs]}


def samples_to_reach(points, target):
    for p in points:
        if p["reward"] >= target:
            return p["samples"]
    return None


def main_cli(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/compare_methods")
    p.add_argument("--samples", type=int, default=960, help="training samples each method generates")
    p.add_argument("--val-points", type=int, default=3, help="validations per run")
    p.add_argument("--limit-val-batches", type=int, default=12,
                   help="validation micro-batches of 8 prompts (12 = all 96 held-out prompts)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="1234", help="comma list; curves and the table average over seeds")
    p.add_argument("--reward", default="embedded_clip_score", help="reward on the embedded model")
    p.add_argument("--include", action="append", default=[],
                   help="compare_methods.json of another run of this script (same settings, other --methods) "
                        "to merge into the table and plot; repeatable")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    sd, common, setting = model_and_reward(args.reward)
    seeds = [int(x) for x in args.seeds.split(",")]
    print(f"setting: {setting}; seeds {seeds}")
    results, per_seed = {}, {}
    for path in args.include:
        with open(path) as f:
            other = json.load(f)
        if other["setting"] != setting or other["args"]["samples"] != args.samples:
            raise SystemExit(f"--include {path}: it ran {other['setting']!r} with {other['args']['samples']} samples, "
                             f"this run {setting!r} with {args.samples}")
        results.update(other["results"])
        per_seed.update(other["per_seed"])
    for name in [m for m in args.methods.split(",") if m]:
        if name not in METHODS:
            raise SystemExit(f"--methods: unknown {name!r}; expected some of {', '.join(METHODS)}")
        per_seed[name] = [run_method(name, sd, common, args.out, args.samples, args.val_points, args.limit_val_batches,
                                     seed) for seed in seeds]
        results[name] = average_over_seeds(per_seed[name])
        print(name, results[name]["points"][-1])
    target = results["DDPO"]["points"][-1]["reward"] if "DDPO" in results else None
    # "samples to reach DDPO's final" means something only when DDPO ended above the base
    ddpo_gained = target is not None and target > results["DDPO"]["points"][0]["reward"]
    rows = []
    for name, r in results.items():
        pts = r["points"]
        need = samples_to_reach(pts, target) if ddpo_gained else None
        rows.append({"method": name, "base": pts[0]["reward"], "final": pts[-1]["reward"],
                     "gain": pts[-1]["reward"] - pts[0]["reward"], "samples": pts[-1]["samples"],
                     "samples_to_ddpo_final": need, "train_wall_s": pts[-1]["wall_s"], "run_s": r["total_s"],
                     "gain_per_seed": r["final_per_seed"]})
    with open(os.path.join(args.out, "compare_methods.json"), "w") as f:
        json.dump({"setting": setting, "args": vars(args), "results": results, "per_seed": per_seed, "table": rows},
                  f, indent=1)
    lines = [(f"Setting: {setting}; {args.samples} training samples per method, held-out reward on "
              f"{8 * args.limit_val_batches} prompts (fixed latents), mean over seeds {seeds}."), "",
             ("| method | base reward | final reward | gain | gain per seed | samples generated | "
              "samples to reach DDPO's final | train wall time (s) |"), "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not ddpo_gained:
            need = "– (DDPO did not gain)" if target is not None else "–"
        else:
            need = "not reached" if r["samples_to_ddpo_final"] is None else str(r["samples_to_ddpo_final"])
        each = ", ".join(f"{g:+.3g}" for g in r["gain_per_seed"])
        lines.append(f"| {r['method']} | {r['base']:.4g} | {r['final']:.4g} | {r['gain']:+.3g} | {each} | "
                     f"{r['samples']} | {need} | {r['train_wall_s']:.1f} |")
    lines += ["", "Held-out reward at each validation point (samples generated → reward):", "",
              "| method | " + " | ".join(f"{p['samples']}" for p in next(iter(results.values()))["points"]) + " |",
              "|---|" + "---|" * len(next(iter(results.values()))["points"])]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{p['reward']:.2f}" for p in r["points"]) + " |")
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
