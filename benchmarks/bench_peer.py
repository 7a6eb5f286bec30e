"""Our DRaFT-K=1 LoRA training step vs trl 0.23.1's ``AlignPropTrainer`` with fixed truncation at
the last step, and our DDPO epoch vs trl's ``DDPOTrainer.step``, on the identical tiny pipeline.

AlignProp pair: 64 px, 10 DDIM steps (eta 0), CFG 7.5, batch 2, LoRA r4 on the attention
projections, AdamW lr 1e-3, gradient-norm clip 1, mean-brightness reward, fp32, one thread.

The peer runs in its own virtual environment (``benchmarks/.peer-venv``, created on first use from
``benchmarks/peer-constraints.txt``: trl 0.23.1 with the diffusers / transformers / peft /
accelerate it supports, on the same torch 2.14.1). The tiny pipeline is saved once by our package
and copied into a layout transformers 4.57 reads (same tensors; checked by a fingerprint below).

Both implementations run alternately (A B, B A, ...) in fresh subprocesses; each process does
``--warmup`` untimed steps then ``--steps`` timed ones. Reported: median images/s, per-process peak
RSS, per-pair ratios and their medians against the targets (>= 4x images/s, <= 0.8x peak memory).
DDPO pair: the same but eta 1, lr 3e-4, one step = one epoch (sample the batch, one inner epoch of
PPO-clip over all 10 steps, one optimizer step).

``--size sd15``: the same AlignProp comparison at SD1.5 architecture size (UNet 860M, VAE, CLIP-L
text encoder of the published shapes, random weights saved once in fp32 by
``nemo_aligner_draft.testing.realsize``), 256 px, 20 DDIM steps by default, batch 1, LoRA r4/alpha 4
on to_q/k/v/out.0 on both sides, per-UNet-call checkpointing on both sides (trl always checkpoints;
ours with ``DraftConfig(checkpoint=True)``). Each of our processes also times **the floor**
(``workers/floor_draft.py``: T−1 no-grad CFG UNet calls + DDIM, one CFG call with grad, decode, reward,
backward, clip + AdamW, as bare diffusers/torch calls on the same modules) right after our own timed
steps. Writes ``peer_alignprop_sd15.*``; targets: ours ≤ 1.15× the floor, faster than trl, memory
added by training ≤ trl's.

``--package head`` runs our workers on a snapshot of the package at git HEAD (``git archive``), so that
edits made to the work tree while the benchmark runs do not change what is measured; ``worktree``
snapshots the work tree at the start; ``live`` (the default) imports the work tree as it is.

Usage: python benchmarks/bench_peer.py [--size tiny|sd15] [--pairs 4] [--steps 5] [--warmup 2]
       [--sampler-steps T] [--batch B] [--which alignprop,ddpo] [--package live|head|worktree] [--no-install]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (BENCH, OUR_PYTHON, ROOT, TMP, ensure_realsize_sd, ensure_tiny_sd, log, machine_info,  # noqa: E402
                    md_table, median, peer_pipeline_copy, plot_path, pyplot, run_worker, write_json,
                    write_markdown)

PEER_VENV = os.path.join(BENCH, ".peer-venv")
PEER_PYTHON = os.path.join(PEER_VENV, "bin", "python")
PEER_CONSTRAINTS = os.path.join(BENCH, "peer-constraints.txt")
TRL_LORA = "to_q,to_k,to_v,to_out.0"  # trl's DefaultDDPOStableDiffusionPipeline LoRA targets (r=4, alpha=4)
# per size: (height, default sampler steps, default batch, our sampler checkpointing, default floor steps)
SIZES = {"tiny": (64, 10, 2, False, 0), "sd15": (256, 20, 1, True, None)}  # None: as many as --steps
TARGET_SPEED, TARGET_MEM = 4.0, 0.8  # tiny size (issue targets of the first comparison)
TARGET_FLOOR = 1.15  # sd15: our step within 1.15x the floor


def spread(xs) -> dict:
    xs = [float(x) for x in xs]
    return {"median": median(xs), "min": min(xs), "max": max(xs)}


def fmt_spread(xs, digits=2) -> str:
    sp = spread(xs)
    return f"{sp['median']:.{digits}f} ({sp['min']:.{digits}f}–{sp['max']:.{digits}f})"


def package_snapshot(mode: str) -> dict:
    """Where our workers import ``nemo_aligner_draft`` from: the live work tree, or a copy taken now."""
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    diff = subprocess.run(["git", "-C", ROOT, "diff", "HEAD", "--", "nemo_aligner_draft"], capture_output=True,
                          text=True).stdout
    info = {"mode": mode, "git_head": head, "worktree_diff_sha1": hashlib.sha1(diff.encode()).hexdigest(),
            "worktree_dirty": bool(diff.strip())}
    if mode == "live":
        return info
    dst = os.path.join(TMP, f"package_{mode}")
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    if mode == "head":
        arch = subprocess.run(["git", "-C", ROOT, "archive", "HEAD", "nemo_aligner_draft"], capture_output=True,
                              check=True).stdout
        subprocess.run(["tar", "-x", "-C", dst], input=arch, check=True)
    else:
        shutil.copytree(os.path.join(ROOT, "nemo_aligner_draft"), os.path.join(dst, "nemo_aligner_draft"),
                        ignore=shutil.ignore_patterns("__pycache__"))
    info["path"] = dst
    info["taken_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    return info


def ensure_peer_venv(install: bool) -> None:
    if os.path.exists(PEER_PYTHON):
        r = subprocess.run([PEER_PYTHON, "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip() == "0.23.1":
            return
    if not install:
        raise SystemExit(f"no working peer venv at {PEER_VENV}; run without --no-install")
    log(f"creating the peer venv {PEER_VENV} (trl 0.23.1; a few minutes)")
    subprocess.run([sys.executable if not os.path.exists("/usr/bin/python3") else "/usr/bin/python3",
                    "-m", "venv", PEER_VENV], check=True)
    subprocess.run([PEER_PYTHON, "-m", "pip", "install", "-q", "-c", PEER_CONSTRAINTS, "trl==0.23.1",
                    "diffusers", "transformers", "peft", "accelerate"], check=True)


def fingerprints(ours_dir: str, peer_dir: str) -> dict:
    fp = os.path.join(BENCH, "workers", "fingerprint.py")
    a = run_worker(OUR_PYTHON, fp, [ours_dir])
    b = run_worker(PEER_PYTHON, fp, [peer_dir])
    same = a["ids"] == b["ids"] and all(abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])) for k in ("text", "unet", "vae"))
    return {"ours": a, "peer": b, "identical": same}


def summarize(run: dict) -> dict:
    s = median(run["step_s"])
    out = {"step_s_median": s, "step_s_min": min(run["step_s"]), "images_per_s": run["images_per_step"] / s,
           "peak_rss_mb": run["peak_rss_mb"], "train_mb": run["peak_rss_mb"] - run["rss_before_train_mb"],
           "rss_before_train_mb": run["rss_before_train_mb"], "rss_after_import_mb": run.get("rss_after_import_mb"),
           "step_s": run["step_s"], "process_wall_s": run.get("process_wall_s"), "lora_params": run.get("lora_params"),
           "package_file": run.get("package_file")}
    if "floor" in run:
        f = run["floor"]
        fs = median(f["step_s"])
        out["floor"] = {"step_s_median": fs, "step_s_min": min(f["step_s"]), "step_s": f["step_s"],
                        "images_per_s": run["images_per_step"] / fs,
                        "phases_s_median": {k: median(v) for k, v in f["phases_s"].items()},
                        "phases_s": f["phases_s"], "peak_rss_mb_after": f["peak_rss_mb_after"]}
    return out


def kinds(steps: int) -> dict:
    # kind: (our worker, peer worker, our extra args, label of ours, label of the peer, settings)
    return {
        "alignprop": ("ours_draft.py", "trl_alignprop.py", ["1", "0"], "ours DRaFT K=1", "trl AlignProp K=1",
                      {"eta": 0.0, "ours": "DRaFT K=1, kl_coeff 0 (core.draft.draft_objective)",
                       "peer": "trl 0.23.1 AlignPropTrainer, truncated_backprop_rand=False, "
                               f"truncated_backprop_timestep={steps - 1}", "lr": 1e-3}),
        "ddpo": ("ours_ddpo.py", "trl_ddpo.py", [], "ours DDPO", "trl DDPO",
                 {"eta": 1.0, "ours": "core.ddpo rollout + PPO-clip over all steps, one AdamW step per train batch",
                  "peer": "trl 0.23.1 DDPOTrainer, 1 sample batch and 1 inner epoch per step, "
                          "timestep_fraction 1, train_cfg", "lr": 3e-4}),
    }


def compare(kind: str, ours_dir: str, peer_dir: str, a, pkg: dict) -> tuple:
    height, batch, steps, ckpt = a.height, a.batch, a.sampler_steps, a.checkpoint
    ours_script, peer_script, extra, ours_label, peer_label, settings = kinds(steps)[kind]
    ours_w = os.path.join(BENCH, "workers", ours_script)
    peer_w = os.path.join(BENCH, "workers", peer_script)
    floor_steps = a.floor_steps if kind == "alignprop" else 0
    ours_env = {"PYTHONPATH": pkg["path"] + os.pathsep + ROOT} if pkg.get("path") else None

    def run_ours():
        args = [ours_dir, str(batch), str(steps), *extra]
        if kind == "alignprop":
            args += [str(int(ckpt)), str(a.warmup), str(a.steps), str(height), "4", a.lora_targets, str(floor_steps)]
        else:
            args += [str(a.warmup), str(a.steps)]
        return run_worker(OUR_PYTHON, ours_w, args, timeout=a.timeout, extra_env=ours_env)

    def run_peer():
        args = [peer_dir, str(batch), str(steps), str(a.warmup), str(a.steps), os.path.join(TMP, "trl_work")]
        if kind == "alignprop":
            args.append(str(height))
        return run_worker(PEER_PYTHON, peer_w, args, timeout=a.timeout)

    pairs = []
    loads = []
    for p in range(a.pairs):
        order = [("ours", run_ours), ("trl", run_peer)]
        if p % 2:
            order.reverse()
        res = {}
        for name, fn in order:
            log(f"{kind} pair {p + 1}/{a.pairs}: {name}")
            loads.append(os.getloadavg()[0])
            res[name] = summarize(fn())
            msg = (f"  {name}: {res[name]['images_per_s']:.3g} images/s (steps {', '.join(f'{t:.2f}' for t in res[name]['step_s'])} s), "
                   f"peak RSS {res[name]['peak_rss_mb']:.0f} MB, training adds {res[name]['train_mb']:.0f} MB")
            if "floor" in res[name]:
                msg += f"; floor steps {', '.join(f'{t:.2f}' for t in res[name]['floor']['step_s'])} s"
            log(msg)
        res["speed_ratio"] = res["ours"]["images_per_s"] / res["trl"]["images_per_s"]
        res["mem_ratio"] = res["ours"]["peak_rss_mb"] / res["trl"]["peak_rss_mb"]
        res["train_mem_ratio"] = res["ours"]["train_mb"] / res["trl"]["train_mb"]
        if floor_steps:
            res["floor_ratio"] = res["ours"]["step_s_median"] / res["ours"]["floor"]["step_s_median"]
            res["trl_floor_ratio"] = res["trl"]["step_s_median"] / res["ours"]["floor"]["step_s_median"]
        res["order"] = [n for n, _ in order]
        pairs.append(res)
    loads.append(os.getloadavg()[0])
    ratio_keys = ["speed_ratio", "mem_ratio", "train_mem_ratio"] + (["floor_ratio", "trl_floor_ratio"] if floor_steps else [])
    ratios = {k: {**spread([p[k] for p in pairs]), "per_pair": [p[k] for p in pairs]} for k in ratio_keys}
    med = {k: ratios[k]["median"] for k in ratio_keys}
    # Contention on a shared machine only ever adds time, so the fastest step is the least disturbed
    # estimate of each implementation's own cost; reported next to the medians.
    best = {n: min(p[n]["step_s_min"] for p in pairs) for n in ("ours", "trl")}
    if floor_steps:
        best["floor"] = min(p["ours"]["floor"]["step_s_min"] for p in pairs)
        med["best_step_floor_ratio"] = best["ours"] / best["floor"]
        med["best_step_trl_floor_ratio"] = best["trl"] / best["floor"]
    med["best_step_speed_ratio"] = best["trl"] / best["ours"]
    keys = ("images_per_s", "step_s_median", "step_s_min", "peak_rss_mb", "train_mb", "rss_before_train_mb")
    per_impl = {n: {k: spread([p[n][k] for p in pairs]) for k in keys} for n in ("ours", "trl")}
    if floor_steps:
        per_impl["floor"] = {k: spread([p["ours"]["floor"][k] for p in pairs])
                             for k in ("images_per_s", "step_s_median", "step_s_min")}
        per_impl["floor"]["phases_s"] = {ph: spread([p["ours"]["floor"]["phases_s_median"][ph] for p in pairs])
                                         for ph in pairs[0]["ours"]["floor"]["phases_s_median"]}
    lora = {n: pairs[0][n]["lora_params"] for n in ("ours", "trl")}
    if a.size == "tiny":
        targets = {"speed_ratio_min": TARGET_SPEED, "mem_ratio_max": TARGET_MEM}
        met = {"speed": med["speed_ratio"] >= TARGET_SPEED, "memory": med["mem_ratio"] <= TARGET_MEM}
    else:
        targets = {"floor_ratio_max": TARGET_FLOOR, "speed_ratio_min_exclusive": 1.0, "train_mem_ratio_max": 1.0}
        met = {"speed": med["speed_ratio"] > 1.0, "training_memory": med["train_mem_ratio"] <= 1.0}
        if floor_steps:
            met["floor"] = med["floor_ratio"] <= TARGET_FLOOR
    data = {"benchmark": f"peer_{kind}" + ("" if a.size == "tiny" else f"_{a.size}"), "size": a.size,
            "machine": machine_info(),
            "settings": {"pipeline": ours_dir, "height": height, "steps": steps, "cfg": 7.5, "batch": batch,
                         "lora_rank": 4, "lora_alpha": 4, "lora_targets_ours": a.lora_targets,
                         "lora_params": lora, "precision": "fp32", "reward": "mean brightness",
                         "checkpointing": {"trl": "torch.utils.checkpoint(use_reentrant=False) around every UNet "
                                                  "call (pipeline_step_with_grad default)",
                                           "ours": "DraftConfig(checkpoint=%s)" % bool(ckpt),
                                           "floor": "torch.utils.checkpoint(use_reentrant=False) around the one "
                                                    "UNet call with grad" if ckpt else "none"},
                         "warmup": a.warmup, "timed_steps_per_process": a.steps, "pairs": a.pairs,
                         "floor_steps_per_process": floor_steps, "torch_threads": 1, **settings},
            "package": pkg, "load_average_1min_at_each_process_start": loads,
            "pairs": pairs, "per_impl": per_impl, "fastest_step_s": best, "ratios": ratios, "median_ratios": med,
            "targets": targets, "met": met}
    text = report_text(data, ours_label, peer_label, kind)
    return data, text, (ours_label, peer_label)


def report_text(data: dict, ours_label: str, peer_label: str, kind: str) -> str:
    st, pairs, per, r, best = data["settings"], data["pairs"], data["per_impl"], data["ratios"], data["fastest_step_s"]
    floor = "floor" in per
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    rows = []
    for n, lab in (("ours", ours_label), ("trl", peer_label)):
        q = per[n]
        rows.append([lab, fmt_spread([p[n]["images_per_s"] for p in pairs], 4),
                     fmt_spread([p[n]["step_s_median"] for p in pairs], 1), f"{best[n]:.1f}",
                     fmt_spread([p[n]["peak_rss_mb"] for p in pairs], 0),
                     f"{q['rss_before_train_mb']['median']:.0f}", fmt_spread([p[n]["train_mb"] for p in pairs], 0)])
    if floor:
        rows.append(["floor (bare calls, same modules, in our process)",
                     fmt_spread([p["ours"]["floor"]["images_per_s"] for p in pairs], 4),
                     fmt_spread([p["ours"]["floor"]["step_s_median"] for p in pairs], 1), f"{best['floor']:.1f}",
                     "-", "-", "-"])
    table = md_table(["implementation", "images/s median (min–max over processes)", "s/step median (min–max)",
                      "fastest step s", "peak RSS MB", "RSS before training MB", "training adds MB"], rows)
    if data["size"] == "tiny":
        rrows = [["images/s", fmt_spread(r["speed_ratio"]["per_pair"]),
                  ", ".join(f"{x:.2f}" for x in r["speed_ratio"]["per_pair"]), ">= 4", yes(data["met"]["speed"])],
                 ["peak RSS", fmt_spread(r["mem_ratio"]["per_pair"]),
                  ", ".join(f"{x:.2f}" for x in r["mem_ratio"]["per_pair"]), "<= 0.8", yes(data["met"]["memory"])],
                 ["images/s from each side's fastest step", f"{data['median_ratios']['best_step_speed_ratio']:.2f}",
                  f"{best['ours']:.3f} s vs {best['trl']:.3f} s", ">= 4", "-"],
                 ["memory added by training", fmt_spread(r["train_mem_ratio"]["per_pair"]),
                  ", ".join(f"{x:.2f}" for x in r["train_mem_ratio"]["per_pair"]), "-", "-"]]
    else:
        rrows = [["images/s, ours / trl", fmt_spread(r["speed_ratio"]["per_pair"], 3),
                  ", ".join(f"{x:.3f}" for x in r["speed_ratio"]["per_pair"]), "> 1", yes(data["met"]["speed"])],
                 ["images/s from each side's fastest step, ours / trl",
                  f"{data['median_ratios']['best_step_speed_ratio']:.3f}",
                  f"{best['ours']:.1f} s vs {best['trl']:.1f} s", "> 1", "-"],
                 ["memory added by training, ours / trl", fmt_spread(r["train_mem_ratio"]["per_pair"], 3),
                  ", ".join(f"{x:.3f}" for x in r["train_mem_ratio"]["per_pair"]), "<= 1",
                  yes(data["met"]["training_memory"])],
                 ["peak RSS, ours / trl", fmt_spread(r["mem_ratio"]["per_pair"], 3),
                  ", ".join(f"{x:.3f}" for x in r["mem_ratio"]["per_pair"]), "-", "-"]]
        if floor:
            rrows += [["s/step, ours / floor (same process)", fmt_spread(r["floor_ratio"]["per_pair"], 3),
                       ", ".join(f"{x:.3f}" for x in r["floor_ratio"]["per_pair"]), "<= 1.15",
                       yes(data["met"]["floor"])],
                      ["fastest step, ours / floor", f"{data['median_ratios']['best_step_floor_ratio']:.3f}",
                       f"{best['ours']:.1f} s vs {best['floor']:.1f} s", "<= 1.15", "-"],
                      ["s/step, trl / floor", fmt_spread(r["trl_floor_ratio"]["per_pair"], 3),
                       ", ".join(f"{x:.3f}" for x in r["trl_floor_ratio"]["per_pair"]), "-", "-"]]
    ratios = md_table(["ratio", "median (min–max) over pairs", "per pair", "target", "met"], rrows)
    title = "tiny SD" if data["size"] == "tiny" else "SD1.5 architecture (random weights)"
    text = (f"### {ours_label} vs {peer_label}: {title}, {st['height']} px, {st['steps']} steps, batch "
            f"{st['batch']}, 1 thread\n\n{table}\n\n{ratios}\n")
    if floor:
        ph = per["floor"]["phases_s"]
        text += ("\nFloor phases, seconds (median over processes of each process's median; min–max): "
                 + "; ".join(f"{k} {v['median']:.2f} ({v['min']:.2f}–{v['max']:.2f})" for k, v in ph.items()) + "\n")
    m = data["machine"]
    loads = data["load_average_1min_at_each_process_start"]
    detail = ""
    if kind == "alignprop":
        detail = (f"LoRA parameters: ours {st['lora_params']['ours']}, trl {st['lora_params']['trl']}. "
                  f"Checkpointing: trl {st['checkpointing']['trl']}; ours {st['checkpointing']['ours']}. ")
    text += (f"\n{detail}"
             f"{st['pairs']} pairs alternated, {st['warmup']} warm-up + {st['timed_steps_per_process']} timed "
             f"steps per process. 1-minute load average at each process start: "
             f"{', '.join(f'{x:.1f}' for x in loads)} ({m.get('cpu')}, {m.get('logical_cpus')} logical CPUs). "
             f"Package: {data['package']['mode']} (git {data['package']['git_head'][:10]}).\n")
    return text


def plot(data: dict, ours_label: str, peer_label: str) -> None:
    pairs = data["pairs"]
    floor = "floor" in data["per_impl"]
    plt = pyplot()
    fig, ax = plt.subplots(1, 3 if floor else 2, figsize=(13 if floor else 9, 3.5))
    xs = range(1, len(pairs) + 1)
    series = [("ours", ours_label, "o-", lambda p: p["ours"]), ("trl", peer_label, "s--", lambda p: p["trl"])]
    for _, lab, m, get in series:
        ax[0].plot(xs, [get(p)["images_per_s"] for p in pairs], m, label=lab)
        ax[1].plot(xs, [get(p)["train_mb"] for p in pairs], m, label=lab)
    if floor:
        ax[0].plot(xs, [p["ours"]["floor"]["images_per_s"] for p in pairs], "^:", label="floor")
        ax[2].plot(xs, [p["floor_ratio"] for p in pairs], "o-", label="ours / floor (s/step)")
        ax[2].plot(xs, [p["trl_floor_ratio"] for p in pairs], "s--", label="trl / floor (s/step)")
        ax[2].axhline(TARGET_FLOOR, color="grey", lw=0.8, ls=":", label=f"target {TARGET_FLOOR}")
        ax[2].set_ylabel("step time / floor")
    ax[0].set_ylabel("images / s")
    ax[1].set_ylabel("memory added by training (MB)")
    for x in ax:
        x.set_xlabel("pair")
        x.legend(fontsize=7)
    fig.suptitle(f"{ours_label} vs {peer_label}, {data['settings']['height']} px, T={data['settings']['steps']}")
    fig.tight_layout()
    fig.savefig(plot_path(data["benchmark"]), dpi=100)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny",
                    help="tiny: the tiny test pipeline at 64 px; sd15: SD1.5 architecture, 256 px")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--sampler-steps", type=int, help="DDIM steps T (default: 10 tiny, 20 sd15)")
    ap.add_argument("--batch", type=int, help="images per step (default: 2 tiny, 1 sd15)")
    ap.add_argument("--floor-steps", type=int, help="floor steps timed in each of our processes "
                    "(default: 0 tiny, --steps sd15)")
    ap.add_argument("--lora-targets", default=TRL_LORA, help="our LoRA target modules (default: trl's)")
    ap.add_argument("--which", default=None, help="comma-separated: alignprop, ddpo (default: both tiny, "
                    "alignprop sd15)")
    ap.add_argument("--package", choices=("live", "head", "worktree"), default="live")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per worker process")
    ap.add_argument("--name", help="results file name instead of peer_<kind>[_<size>] (e.g. tmp/smoke)")
    ap.add_argument("--no-install", action="store_true")
    a = ap.parse_args(argv)
    height, steps, batch, ckpt, floor_steps = SIZES[a.size]
    a.height = height
    a.sampler_steps = a.sampler_steps or steps
    a.batch = a.batch or batch
    a.checkpoint = ckpt
    a.floor_steps = a.floor_steps if a.floor_steps is not None else (a.steps if floor_steps is None else floor_steps)
    which = [k.strip() for k in (a.which or ("alignprop,ddpo" if a.size == "tiny" else "alignprop")).split(",")
             if k.strip()]
    if a.size != "tiny" and which != ["alignprop"]:
        raise SystemExit("--size sd15 compares AlignProp only (--which alignprop)")
    ensure_peer_venv(not a.no_install)
    ours_dir = ensure_tiny_sd() if a.size == "tiny" else ensure_realsize_sd("sd")
    peer_dir = peer_pipeline_copy(ours_dir)
    pkg = package_snapshot(a.package)
    log(f"our package: {pkg}")
    log("fingerprinting the pipeline in both environments")
    fp = fingerprints(ours_dir, peer_dir)
    if not fp["identical"]:
        raise SystemExit(f"the two environments do not load the same pipeline: {fp}")
    out = {}
    for kind in which:
        t0 = time.time()
        data, text, labels = compare(kind, ours_dir, peer_dir, a, pkg)
        if a.name:
            data["benchmark"] = a.name if len(which) == 1 else f"{a.name}_{kind}"
        data["fingerprint"] = fp
        data["wall_s"] = time.time() - t0
        plot(data, *labels)
        write_json(data["benchmark"], data)
        write_markdown(data["benchmark"], text)
        print(text)
        out[kind] = data
    return out


if __name__ == "__main__":
    main()
