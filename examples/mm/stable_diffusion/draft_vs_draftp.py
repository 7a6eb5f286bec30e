"""DRaFT (kl_coeff 0) vs DRaFT+ (kl_coeff > 0) on the embedded model: reward gain and diversity.

An experiment, not a test. Every run trains a LoRA through the real CLI (``conf/draftp_embedded.yaml``,
the ``make demo`` setting: K=5, 10 DDIM steps, CFG 3, batches of 32) for the same number of optimizer
steps, with the same seed, prompts and validation latents; only ``model.kl_coeff`` differs. Validation
(held-out prompts, fixed latents) records the reward and two diversity measures of the tuned model's
images against the base model's images from the same latents:

* ``diversity``: 1 − mean pairwise cosine similarity of TinyCLIP image embeddings (all validation images);
* ``lpips``: mean pairwise LPIPS distance between images of the same prompt (when the config enables it).

Writes to ``--out``: ``draft_vs_draftp.png`` (reward and diversity vs step), ``draft_vs_draftp.md``
(table) and ``draft_vs_draftp.json`` (every validation point).

    OMP_NUM_THREADS=1 python examples/mm/stable_diffusion/draft_vs_draftp.py --out runs/draft_vs_draftp
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def run(kl: float, seed: int, args, sd: str) -> dict:
    from nemo_aligner_draft.cli.train import main

    run_dir = os.path.join(args.out, "runs", f"kl{kl:g}_seed{seed}")
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = ["--config-name=draftp_embedded", f"model.pretrained={sd}", f"exp_manager.explicit_log_dir={run_dir}",
                 f"trainer.max_steps={args.steps}", f"trainer.draftp_sd.max_steps={args.steps}",
                 f"trainer.draftp_sd.val_check_interval={args.val_every}",
                 f"trainer.draftp_sd.save_interval={args.steps}",
                 "exp_manager.create_tensorboard_logger=false", f"model.kl_coeff={kl}", f"model.seed={seed}"]
    if args.limit_val_batches is not None:
        overrides.append(f"trainer.draftp_sd.limit_val_batches={args.limit_val_batches}")
    if args.lr is not None:
        overrides.append(f"model.optim.lr={args.lr}")
    overrides += args.override
    t0 = time.perf_counter()
    rc = main(overrides)
    if rc != 0:
        raise SystemExit(f"kl_coeff={kl} seed={seed}: training exited with {rc}")
    seconds = time.perf_counter() - t0
    val = json.load(open(os.path.join(run_dir, "metrics.json")))["validation"]
    first, last = val[0], val[-1]
    points = [{"step": 0, "reward": first["reward_base"], "diversity": first.get("diversity_base"),
               "lpips": first.get("lpips_diversity_base")}]
    points += [{"step": v["step"], "reward": v["reward_tuned"], "diversity": v.get("diversity_tuned"),
                "lpips": v.get("lpips_diversity_tuned")} for v in val]
    return {"kl_coeff": kl, "seed": seed, "points": points, "seconds": seconds, "prompts": len(last["prompts"]),
            "gain_standard_error": last["gain_standard_error"], "images_improved": last["images_improved"]}


def _fmt(x, spec=".3f"):
    return "–" if x is None else format(x, spec)


def table(results, args) -> str:
    lr = "the config's" if args.lr is None else args.lr
    lines = [f"{args.steps} optimizer steps (LoRA, lr {lr}), held-out reward and diversity on "
             f"{results[0]['prompts']} prompts from fixed latents; seeds {args.seeds}. Gain: mean paired "
             f"per-image difference (tuned − base, same latents) ± its standard error.", "",
             "| kl_coeff | seed | reward base → tuned | gain ± SE | images improved | diversity base → tuned "
             "| LPIPS diversity base → tuned | run (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        a, b = r["points"][0], r["points"][-1]
        lines.append(f"| {r['kl_coeff']:g} | {r['seed']} | {a['reward']:.2f} → {b['reward']:.2f} | "
                     f"{b['reward'] - a['reward']:+.2f} ± {r['gain_standard_error']:.2f} | "
                     f"{r['images_improved']}/{r['prompts']} | {_fmt(a['diversity'])} → {_fmt(b['diversity'])} | "
                     f"{_fmt(a['lpips'])} → {_fmt(b['lpips'])} | {r['seconds']:.0f} |")
    kls = sorted({r["kl_coeff"] for r in results})
    if len(results) > len(kls):
        lines += ["", "Mean over seeds:", "", "| kl_coeff | gain | diversity tuned | LPIPS diversity tuned |",
                  "|---|---|---|---|"]
        for kl in kls:
            rs = [r for r in results if r["kl_coeff"] == kl]
            gain = statistics.mean(r["points"][-1]["reward"] - r["points"][0]["reward"] for r in rs)
            div = [r["points"][-1]["diversity"] for r in rs if r["points"][-1]["diversity"] is not None]
            lp = [r["points"][-1]["lpips"] for r in rs if r["points"][-1]["lpips"] is not None]
            lines.append(f"| {kl:g} | {gain:+.2f} | {_fmt(statistics.mean(div) if div else None)} | "
                         f"{_fmt(statistics.mean(lp) if lp else None)} |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("reward", "held-out embedded_clip_score"), ("diversity", "TinyCLIP embedding diversity"),
            ("lpips", "LPIPS diversity (same prompt)")]
    keys = [k for k in keys if all(p[k[0]] is not None for r in results for p in r["points"])]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.8))
    for ax, (key, label) in zip(axes if len(keys) > 1 else [axes], keys):
        for r in results:
            style = "-" if r["kl_coeff"] == 0 else "--"
            ax.plot([p["step"] for p in r["points"]], [p[key] for p in r["points"]], "o" + style,
                    label=f"{'DRaFT' if r['kl_coeff'] == 0 else 'DRaFT+'} kl={r['kl_coeff']:g} seed={r['seed']}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    (axes[0] if len(keys) > 1 else axes).legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main_cli(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/draft_vs_draftp")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--val-every", type=int, default=10)
    p.add_argument("--limit-val-batches", type=int, default=None,
                   help="validation micro-batches (default: the config's, 12 of 8 = all 96 held-out prompts)")
    p.add_argument("--kl", default="0,100,1000", help="comma list of kl_coeff values (0 = DRaFT)")
    p.add_argument("--seeds", default="1234", help="comma list of seeds")
    p.add_argument("--lr", type=float, default=None, help="default: the config's (0.002)")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from nemo_aligner_draft.embedded import models

    sd = models.pipeline_path()
    os.makedirs(args.out, exist_ok=True)
    kls = [float(k) for k in args.kl.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    results = [run(kl, seed, args, sd) for seed in seeds for kl in kls]
    text = table(results, args)
    with open(os.path.join(args.out, "draft_vs_draftp.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)
    with open(os.path.join(args.out, "draft_vs_draftp.md"), "w") as f:
        f.write(text)
    plot(results, os.path.join(args.out, "draft_vs_draftp.png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    sys.exit(main_cli())
