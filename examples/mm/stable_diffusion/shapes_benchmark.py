"""The shapes benchmark: every method on the embedded model's shape reward over several seeds, and the
three questions of docs/experiments.md (Q1 diversity of DRaFT vs DRaFT+, Q2 samples to reach DDPO's
reward, Q3 few-step reward of SDPO vs DDPO).

An experiment, not a test. Every run trains through the real CLI (``nemo_aligner_draft.cli.train``) with
a shipped config (``conf/*_shapes.yaml``; the task is ``nemo_aligner_draft/embedded/benchmark.py``) and
validates on the 18 benchmark prompts from 4 fixed latents each, base (adapters off) and fine-tuned
from the same latents. A run's result (``<out>/runs/<run>_seed<s>/result.json``) is kept: rerunning
skips finished runs, so the work can be split over processes with ``--only`` and merged with
``--report``::

    OMP_NUM_THREADS=1 python examples/mm/stable_diffusion/shapes_benchmark.py --out runs/shapes --only DRaFT+,DRaFT,DRaFT-LV &
    OMP_NUM_THREADS=1 python examples/mm/stable_diffusion/shapes_benchmark.py --out runs/shapes --only AlignProp,DDPO,SDPO &
    wait; python examples/mm/stable_diffusion/shapes_benchmark.py --out runs/shapes --report --docs docs

``--report`` writes ``shapes_benchmark.md`` (tables), ``shapes_benchmark.json`` (every validation
point of every run), ``shapes_curves.png``, ``shapes_q1.png`` and ``shapes_grid.png`` to ``--out``;
with ``--docs DIR`` it also copies the figures and the JSON there and replaces the section between the
``shapes-benchmark`` markers of ``DIR/experiments.md`` with the tables.

Statistics: a run's gain is the mean paired per-image difference tuned − base over the 72 validation
images, with its standard error; across seeds the table gives the mean gain and a 95 % Student-t
interval over the seeds (n − 1 degrees of freedom), so with 3 seeds the interval is wide by design.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import sys
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
EMBEDDED_SD = os.path.join(REPO, "nemo_aligner_draft", "embedded", "assets", "sd")
MARK_BEGIN, MARK_END = "<!-- shapes-benchmark:begin -->", "<!-- shapes-benchmark:end -->"

# run -> (config, loop section, overrides, samples generated per optimizer step, optimizer steps per
# training step, optimizer steps, validate every this many training steps). "Samples" counts the images
# a method generates for training (SDPO: both trajectories of a pair). The methods' settings are their
# configs'. Q1 compares the DRaFT and DRaFT+ runs, Q2 the DDPO run with the others' curves, Q3 the DDPO,
# SDPO and GRPO runs' validation at 1, 2, 4 and 8 sampler steps (SDPO trains on 4 steps, the others on 10).
RUNS = {
    "DRaFT+": ("draftp_shapes", "draftp_sd", [], 32, 1, 60, 2),
    "DRaFT": ("draftp_shapes", "draftp_sd", ["model.kl_coeff=0.0"], 32, 1, 60, 2),
    "DRaFT-LV": ("draftp_shapes", "draftp_sd", ["model.kl_coeff=0.0", "model.truncation_steps=1",
                                                "model.lv_copies=2"], 32, 1, 20, 2),
    "AlignProp": ("alignprop_shapes", "alignprop", [], 32, 1, 20, 2),
    "DDPO": ("ddpo_shapes", "ddpo", [], 72, 2, 60, 3),
    "SDPO": ("sdpo_shapes", "sdpo", [], 72, 2, 30, 2),
    # SDPO on the 10-step sampler the others use: its dense returns are dominated by the early steps' blurred
    # x̂0 on this (not distilled) model, see sdpo_shapes.yaml
    "SDPO-10": ("sdpo_shapes", "sdpo", ["model.infer.inference_steps=10"], 72, 2, 40, 2),
    "GRPO": ("grpo_shapes", "grpo", [], 72, 2, 60, 3),
}
# Q1 compares the DRaFT and DRaFT+ runs above (the same settings but kl_coeff)
Q1_PAIR = ("DRaFT", "DRaFT+")
GAIN_METHODS = ["DRaFT+", "DRaFT", "DRaFT-LV", "AlignProp", "DDPO", "SDPO", "SDPO-10", "GRPO"]
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def run_dir(out: str, name: str, seed: int) -> str:
    return os.path.join(out, "runs", f"{name.replace(' ', '_').replace('+', 'p')}_seed{seed}")


def paired(v: Dict) -> Dict:
    """Gain, its SE and the z of one validation entry (paired per-image differences)."""
    d = [t - b for t, b in zip(v["rewards_tuned"], v["rewards_base"])]
    n = len(d)
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    return {"gain": mean, "se": se, "z": mean / se if se > 0 else float("nan"), "n": n,
            "base": sum(v["rewards_base"]) / n, "tuned": sum(v["rewards_tuned"]) / n}


def train_one(name: str, out: str, seed: int) -> Dict:
    """Train one run through the CLI (or read its finished result) and summarise its validations."""
    from nemo_aligner_draft.cli.train import main

    path = run_dir(out, name, seed)
    result_path = os.path.join(path, "result.json")
    cfg, loop, extra, per_opt, opt_per_train, opt_steps, val_every = RUNS[name]
    earlier_s = 0.0  # wall time of the part of a resumed run that ran before
    if os.path.isfile(result_path):
        with open(result_path) as f:
            done = json.load(f)
        if done["points"][-1]["step"] >= opt_steps:
            return done
        earlier_s = done["run_s"]
        os.remove(result_path)  # RUNS asks for more steps than this run took: resume it from its last checkpoint
    if not glob.glob(os.path.join(path, "checkpoints", "*-last.ckpt")):
        shutil.rmtree(path, ignore_errors=True)  # nothing to resume: start clean
    args = [f"--config-name={cfg}", f"model.pretrained={EMBEDDED_SD}", f"exp_manager.explicit_log_dir={path}",
            f"trainer.max_steps={opt_steps}", f"trainer.{loop}.max_steps={opt_steps}",
            f"trainer.{loop}.val_check_interval={val_every}", f"trainer.{loop}.save_interval={opt_steps}",
            "exp_manager.create_tensorboard_logger=false", f"model.seed={seed}", *extra]
    t0 = time.perf_counter()
    rc = main(args)
    if rc != 0:
        raise SystemExit(f"{name} seed {seed}: training exited with {rc}")
    return summarise(name, path, seed, earlier_s + time.perf_counter() - t0)


def summarise(name: str, path: str, seed: int, total: float) -> Dict:
    """The run's validations as benchmark points (written to its result.json); ``total``: its wall time."""
    cfg, loop, extra, per_opt, opt_per_train, opt_steps, val_every = RUNS[name]
    result_path = os.path.join(path, "result.json")
    with open(os.path.join(path, "metrics.json")) as f:
        metrics = json.load(f)
    train_time, clock = 0.0, {}
    for h in metrics["train"]:
        st = h.get("epoch_time", h.get("step_time", 0.0))
        train_time += 0.0 if st is None or math.isnan(st) else st
        clock[h["step"]] = train_time
    points = [{"step": 0, "samples": 0, "gain": 0.0, "se": 0.0, "wall_s": 0.0}]
    for v in metrics["validation"]:
        p = {"step": v["step"], "samples": v["step"] * per_opt, "wall_s": clock.get(v["step"], train_time),
             **paired(v)}
        for key in v:
            if key.startswith(("prompt_diversity", "reward_steps")):
                p[key] = v[key]
        points.append(p)
    final_png = os.path.join(path, "images", f"val_step{metrics['validation'][-1]['step']:06d}.png")
    result = {"name": name, "seed": seed, "config": cfg, "overrides": extra, "points": points, "run_s": total,
              "final_png": final_png if os.path.isfile(final_png) else None,
              "prompts": metrics["validation"][-1]["prompts"]}
    with open(result_path, "w") as f:
        json.dump(result, f, indent=1)
    return result


# ---------------------------------------------------------------------------------------------- report
def mean_ci(values: List[float]):
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1))
    return mean, T975.get(n - 1, 1.96) * sd / math.sqrt(n)


def fmt_ci(values: List[float], digits: int = 2) -> str:
    m, h = mean_ci(values)
    return f"{m:+.{digits}f} ± {h:.{digits}f}" if not math.isnan(h) else f"{m:+.{digits}f}"


def mean_curve(runs: List[Dict], key: str = "gain") -> List[Dict]:
    """Point-wise mean over seeds (every seed validates at the same steps)."""
    n = len(runs)
    return [{"samples": p0["samples"], "step": p0["step"], key: sum(r["points"][i][key] for r in runs) / n}
            for i, p0 in enumerate(runs[0]["points"]) if all(key in r["points"][i] for r in runs)]


def samples_to_reach(curve: List[Dict], target: float):
    """Samples at which the curve (linear between validation points, from 0 gain at 0 samples) first
    reaches ``target``; with the bracketing validation points. None if it never does."""
    for a, b in zip(curve, curve[1:]):
        if b["gain"] >= target:
            if a["gain"] >= target:
                return a["samples"], (a["samples"], a["samples"])
            frac = (target - a["gain"]) / (b["gain"] - a["gain"])
            return a["samples"] + frac * (b["samples"] - a["samples"]), (a["samples"], b["samples"])
    return None, None


def diversity_at(curve_g: List[Dict], curve_d: List[Dict], target: float):
    """Diversity where the gain curve first reaches ``target`` (linear between validation points)."""
    for (a, b), (da, db) in zip(zip(curve_g, curve_g[1:]), zip(curve_d, curve_d[1:])):
        if b["gain"] >= target:
            frac = 0.0 if a["gain"] >= target else (target - a["gain"]) / (b["gain"] - a["gain"])
            return da["div"] + frac * (db["div"] - da["div"])
    return None


def report(out: str, seeds: List[int], docs: Optional[str]) -> int:
    results: Dict[str, List[Dict]] = {}
    for name in RUNS:
        got = [json.load(open(os.path.join(run_dir(out, name, s), "result.json"))) for s in seeds
               if os.path.isfile(os.path.join(run_dir(out, name, s), "result.json"))]
        if got:
            results[name] = got
    if not results:
        raise SystemExit(f"--report: no finished runs under {out}/runs")
    lines = [f"Seeds {', '.join(map(str, seeds))}; ± is the 95 % t interval over seeds; per seed: gain ± SE "
             f"(72 paired images).", ""]
    # every method's gain
    lines += ["| method | config | samples | held-out gain, mean over seeds | per seed (gain ± SE, z) | "
              "prompt diversity base → tuned | train time per run (s) |", "|---|---|---|---|---|---|---|"]
    for name in GAIN_METHODS:
        if name not in results:
            continue
        runs = results[name]
        finals = [r["points"][-1] for r in runs]
        each = "; ".join(f"{p['gain']:+.2f} ± {p['se']:.2f} (z {p['z']:.1f})" for p in finals)
        div = ""
        if all("prompt_diversity_tuned" in p for p in finals):
            div = (f"{sum(p['prompt_diversity_base'] for p in finals) / len(finals):.3f} → "
                   f"{sum(p['prompt_diversity_tuned'] for p in finals) / len(finals):.3f}")
        extra = " ".join(runs[0]["overrides"])
        lines.append(f"| {name} | `{runs[0]['config']}`{(' ' + extra) if extra else ''} | {finals[0]['samples']} | "
                     f"**{fmt_ci([p['gain'] for p in finals])}** | {each} | {div} | "
                     f"{sum(p['wall_s'] for p in finals) / len(finals):.0f} |")
    summary = {"seeds": seeds, "runs": results}
    # Q1
    q1 = {}
    if Q1_PAIR[0] in results and Q1_PAIR[1] in results:
        lines += ["", "**Q1 — diversity at matched reward (DRaFT vs DRaFT+).** Per seed, the reward level both "
                  "runs reach (the smaller of the two best gains); each run's per-prompt diversity where its "
                  "curve first reaches it, and at the end of the run:", "",
                  "| seed | matched gain | DRaFT diversity | DRaFT+ diversity | ratio | final gain DRaFT / DRaFT+ | "
                  "final diversity DRaFT / DRaFT+ (base) |", "|---|---|---|---|---|---|---|"]
        ratios, final_ratios = [], []
        for a, b in zip(results[Q1_PAIR[0]], results[Q1_PAIR[1]]):
            ga = [{"gain": p["gain"]} for p in a["points"]]
            gb = [{"gain": p["gain"]} for p in b["points"]]
            da = [{"div": p.get("prompt_diversity_tuned", a["points"][1]["prompt_diversity_base"])} for p in a["points"]]
            db = [{"div": p.get("prompt_diversity_tuned", b["points"][1]["prompt_diversity_base"])} for p in b["points"]]
            level = min(max(p["gain"] for p in ga), max(p["gain"] for p in gb))
            va, vb = diversity_at(ga, da, level), diversity_at(gb, db, level)
            ratio = vb / va if va and vb is not None else float("nan")
            ratios.append(ratio)
            fa, fb = a["points"][-1], b["points"][-1]
            final_ratios.append(fb["prompt_diversity_tuned"] / fa["prompt_diversity_tuned"])
            lines.append(f"| {a['seed']} | {level:+.2f} | {va:.3f} | {vb:.3f} | {ratio:.2f} | "
                         f"{fa['gain']:+.2f} / {fb['gain']:+.2f} | {fa['prompt_diversity_tuned']:.3f} / "
                         f"{fb['prompt_diversity_tuned']:.3f} ({fa['prompt_diversity_base']:.3f}) |")
        m, h = mean_ci(ratios)
        fm, fh = mean_ci(final_ratios)
        q1 = {"ratio_at_matched": ratios, "ratio_final": final_ratios}
        lines += ["", f"Diversity ratio DRaFT+ / DRaFT at matched reward: **{m:.2f} ± {h:.2f}** (target ≥ 1.5: "
                  f"{'met' if m >= 1.5 else 'not met'}); at the end of the runs {fm:.2f} ± {fh:.2f}."]
    # Q2
    q2 = {}
    if "DDPO" in results:
        ddpo = mean_curve(results["DDPO"])
        target, ddpo_samples = ddpo[-1]["gain"], ddpo[-1]["samples"]
        lines += ["", f"**Q2 — samples to reach DDPO's final reward.** DDPO's mean gain after {ddpo_samples} samples: "
                  f"{target:+.2f}.", ""]
        if target <= 0:
            lines.append("DDPO did not gain, so the question has no answer on this run.")
        else:
            lines += ["| method | samples to DDPO's final gain (mean curve; bracketing validations) | DDPO's samples ÷ "
                      "that | per seed |", "|---|---|---|---|"]
            for name in ("DRaFT+", "AlignProp", "DRaFT", "DRaFT-LV"):
                if name not in results:
                    continue
                need, bracket = samples_to_reach(mean_curve(results[name]), target)
                per_seed = [samples_to_reach(r["points"], target)[0] for r in results[name]]
                each = ", ".join("not reached" if s is None else f"{s:.0f}" for s in per_seed)
                if need is None:
                    lines.append(f"| {name} | not reached | – | {each} |")
                else:
                    ratio = ddpo_samples / need if need > 0 else float("inf")
                    q2[name] = {"samples": need, "ratio": ratio, "per_seed": per_seed}
                    lines.append(f"| {name} | {need:.0f} ({bracket[0]}–{bracket[1]}) | **{ratio:.1f}×** "
                                 f"({'met' if ratio >= 25 else 'not met'}: target ≥ 25×) | {each} |")
    # Q3
    q3 = {}
    few = [n for n in ("SDPO", "SDPO-10", "DDPO", "GRPO") if n in results]
    if few:
        lines += ["", "**Q3 — few-step sampling (SDPO vs DDPO, GRPO beside them; SDPO trained on the 4-step sampler, SDPO-10, "
                  "DDPO and GRPO on the 10-step one).** Gain "
                  "(fine-tuned − base, same latents) at each evaluation step count:", "",
                  "| method | 1 step | 2 steps | 4 steps | 8 steps |", "|---|---|---|---|---|"]
        for name in few:
            cells = []
            for n in (1, 2, 4, 8):
                vals = [r["points"][-1][f"reward_steps{n}"] - r["points"][-1][f"reward_steps{n}_base"]
                        for r in results[name] if f"reward_steps{n}" in r["points"][-1]]
                q3.setdefault(name, {})[n] = vals
                cells.append(fmt_ci(vals) if vals else "–")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    summary.update({"q1": q1, "q2": q2, "q3": q3})
    table = "\n".join(lines) + "\n"
    with open(os.path.join(out, "shapes_benchmark.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out, "shapes_benchmark.json"), "w") as f:
        json.dump(summary, f, indent=1)
    figures = plot_curves(results, os.path.join(out, "shapes_curves.png"))
    figures += plot_q1(results, os.path.join(out, "shapes_q1.png"))
    figures += plot_grid(results, os.path.join(out, "shapes_grid.png"))
    print(table)
    if docs:
        for name in figures + ["shapes_benchmark.json"]:
            shutil.copy(os.path.join(out, name), os.path.join(docs, name))
        write_section(os.path.join(docs, "experiments.md"), table)
    return 0


def write_section(path: str, table: str) -> None:
    with open(path) as f:
        text = f.read()
    if MARK_BEGIN not in text or MARK_END not in text:
        raise SystemExit(f"{path}: no {MARK_BEGIN} … {MARK_END} section to replace")
    head, rest = text.split(MARK_BEGIN, 1)
    _, tail = rest.split(MARK_END, 1)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(head + MARK_BEGIN + "\n" + table + MARK_END + tail)
    os.replace(tmp, path)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(results, path) -> List[str]:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in GAIN_METHODS:
        if name not in results:
            continue
        runs = results[name]
        curve = mean_curve(runs)
        xs = [p["samples"] for p in curve]
        ax.plot(xs, [p["gain"] for p in curve], "o-", ms=3, label=f"{name} ({len(runs)} seeds)")
        lo = [min(r["points"][i]["gain"] for r in runs) for i in range(len(curve))]
        hi = [max(r["points"][i]["gain"] for r in runs) for i in range(len(curve))]
        ax.fill_between(xs, lo, hi, alpha=0.15)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("training samples generated")
    ax.set_ylabel("held-out gain, embedded_shape (tuned − base)")
    ax.set_title("shapes benchmark: mean over seeds, band = min–max", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [os.path.basename(path)]


def plot_q1(results, path) -> List[str]:
    if Q1_PAIR[0] not in results or Q1_PAIR[1] not in results:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, colour in ((Q1_PAIR[0], "C0"), (Q1_PAIR[1], "C1")):
        for k, r in enumerate(results[name]):
            pts = [p for p in r["points"] if "prompt_diversity_tuned" in p]
            ax.plot([p["gain"] for p in pts], [p["prompt_diversity_tuned"] for p in pts], "o-", ms=3, color=colour,
                    alpha=0.8, label=name if k == 0 else None)
    ax.set_xlabel("held-out gain (embedded_shape)")
    ax.set_ylabel("per-prompt diversity (TinyCLIP embedding distance)")
    ax.set_title("Q1: diversity vs reward along training, one line per seed", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [os.path.basename(path)]


def plot_grid(results, path, columns: int = 9) -> List[str]:
    """Base row, then one row per method: the first seed's final validation, first latent of the first
    ``columns`` prompts (read back from the run's saved grid)."""
    import numpy as np
    from PIL import Image, ImageDraw

    from nemo_aligner_draft.metrics.figures import split_grid

    rows, names = [], []
    for name in GAIN_METHODS:
        if name not in results or not results[name][0].get("final_png"):
            continue
        r = results[name][0]
        n_images = len(r["prompts"])
        base, tuned = split_grid(np.asarray(Image.open(r["final_png"]).convert("RGB")), n_images)
        k = n_images // len(dict.fromkeys(r["prompts"]))  # latents per prompt
        pick = list(range(0, n_images, k))[:columns]
        if not rows:
            rows.append([base[i] for i in pick])
            names.append("base")
        rows.append([tuned[i] for i in pick])
        names.append(name)
    if not rows:
        return []
    cell, label_w = 96, 90
    canvas = Image.new("RGB", (label_w + columns * (cell + 2), len(rows) * (cell + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for y, (row, name) in enumerate(zip(rows, names)):
        draw.text((4, y * (cell + 2) + cell // 2 - 6), name, fill="black")
        for x, img in enumerate(row):
            canvas.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST),
                         (label_w + x * (cell + 2), y * (cell + 2)))
    canvas.save(path)
    return [os.path.basename(path)]


def main_cli(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/shapes_benchmark")
    p.add_argument("--seeds", default="1234,1,2", help="comma list (>= 3 for intervals that mean something)")
    p.add_argument("--only", default=",".join(RUNS), help=f"runs to train, comma list of: {', '.join(RUNS)}")
    p.add_argument("--report", action="store_true", help="only merge finished runs into tables and figures")
    p.add_argument("--docs", default=None, help="with --report: the docs directory to update")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.report:
        return report(args.out, seeds, args.docs)
    if not os.path.isfile(os.path.join(EMBEDDED_SD, "model_index.json")):
        raise SystemExit(f"{EMBEDDED_SD}: the embedded pipeline is missing (model_index.json)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"--only: unknown {unknown}; expected some of {', '.join(RUNS)}")
    for name in names:
        for seed in seeds:
            r = train_one(name, args.out, seed)
            f = r["points"][-1]
            print(f"{name} seed {seed}: gain {f['gain']:+.2f} ± {f['se']:.2f} after {f['samples']} samples", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    sys.exit(main_cli())
