"""Memory in sampler steps: full-chain backprop with per-step checkpointing at T = 10, 25, 50, and
the truncation sweep K = 1, 2, 5, T with and without checkpointing (tiny SD, 64 px, batch 2, CFG 7.5,
LoRA r4, one thread). Each configuration runs in a fresh subprocess; its peak RSS is the kernel's
high-water mark for that process.

Two memory numbers per configuration:
* ``peak_rss_mb`` — the whole process (libraries and weights included, what ``top`` shows);
* ``train_mb`` — peak RSS minus the RSS just before the first training step: the memory the
  training step itself adds (activations, autograd graph, optimizer state).

and two allocator-independent ones, from one extra step after the measured ones (``graph``): the
autograd nodes reachable from the loss and the MB of tensors autograd saves for backward outside the
checkpointed regions (``ours_draft.graph_stats``).

Checkpointed steps use the sampler's exact step node (``core.sampler._CheckpointedStep``, one autograd
node per step); the full-chain rows are also run with torch's non-reentrant checkpoint
(``checkpoint_impl = "torch"``, the sampler's fallback and its only mode before), for comparison.

Usage: python benchmarks/bench_memory.py [--repeats 3] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (BENCH, OUR_PYTHON, ensure_tiny_sd, log, machine_info, md_table, median,  # noqa: E402
                    plot_path, pyplot, run_worker, write_json, write_markdown)

WORKER = os.path.join(BENCH, "workers", "ours_draft.py")
BATCH = 2


def measure(path, steps, k, ckpt, impl, warmup, repeats):
    env = {"BENCH_GRAPH_STATS": "1"}
    if impl == "torch":
        env["BENCH_SAMPLER_CHECKPOINT"] = "torch"
    r = run_worker(OUR_PYTHON, WORKER, [path, str(BATCH), str(steps), str(k), "0", str(int(ckpt)),
                                        str(warmup), str(repeats)], extra_env=env)
    graph = r.get("graph", {})
    return {"T": steps, "K": k, "checkpoint": ckpt, "checkpoint_impl": impl if ckpt else None,
            "step_s_median": median(r["step_s"]),
            "step_s": r["step_s"], "peak_rss_mb": r["peak_rss_mb"],
            "train_mb": r["peak_rss_mb"] - r["rss_before_train_mb"], "rss_before_train_mb": r["rss_before_train_mb"],
            "autograd_nodes": graph.get("autograd_nodes"), "saved_mb": graph.get("saved_mb")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="T = 10, 25 only (smoke run)")
    a = ap.parse_args(argv)
    path = ensure_tiny_sd()
    t_values = [10, 25] if a.quick else [10, 25, 50]
    t_sweep = max(t_values)
    t_lo, t_hi = min(t_values), max(t_values)
    configs = [(t, t, True, "exact") for t in t_values]
    configs += [(t_sweep, k, c, "exact") for k in (1, 2, 5, t_sweep) for c in (False, True)
                if not (k == t_sweep and c)]
    configs += [(t, t, True, "torch") for t in (t_lo, t_hi)]
    rows = []
    for n, (t, k, c, impl) in enumerate(configs):
        log(f"memory {n + 1}/{len(configs)}: T={t} K={k} checkpoint={c}" + (f" ({impl})" if c else ""))
        rows.append(measure(path, t, k, c, impl, a.warmup, a.repeats))
        log(f"  peak RSS {rows[-1]['peak_rss_mb']:.0f} MB, step adds {rows[-1]['train_mb']:.0f} MB, "
            f"{rows[-1]['step_s_median']:.2f} s/step, {rows[-1]['autograd_nodes']} autograd nodes, "
            f"{rows[-1]['saved_mb']:.1f} MB saved")
    full = {r["T"]: r for r in rows if r["K"] == r["T"] and r["checkpoint_impl"] == "exact"}
    full_torch = {r["T"]: r for r in rows if r["K"] == r["T"] and r["checkpoint_impl"] == "torch"}
    ratio_total = full[t_hi]["peak_rss_mb"] / full[t_lo]["peak_rss_mb"]
    ratio_train = full[t_hi]["train_mb"] / full[t_lo]["train_mb"]
    ratio_nodes = full[t_hi]["autograd_nodes"] / full[t_lo]["autograd_nodes"]
    torch_train = full_torch[t_hi]["train_mb"] / full_torch[t_lo]["train_mb"]
    torch_nodes = full_torch[t_hi]["autograd_nodes"] / full_torch[t_lo]["autograd_nodes"]
    summary = {"ratio_peak_rss_T%d_over_T%d" % (t_hi, t_lo): ratio_total,
               "ratio_train_mb_T%d_over_T%d" % (t_hi, t_lo): ratio_train,
               "ratio_autograd_nodes_T%d_over_T%d" % (t_hi, t_lo): ratio_nodes,
               "torch_checkpoint_ratio_train_mb": torch_train, "torch_checkpoint_ratio_autograd_nodes": torch_nodes,
               "target": 1.25, "met_on_peak_rss": ratio_total <= 1.25, "met_on_train_mb": ratio_train <= 1.25}
    data = {"benchmark": "memory", "machine": machine_info(), "settings": {
        "model": "tiny SD (nemo_aligner_draft.testing.tiny)", "height": 64, "batch": BATCH, "cfg": 7.5,
        "lora_rank": 4, "sampler": "DDIM eta 0", "reward": "mean brightness"}, "rows": rows, "summary": summary}
    write_json("memory", data)
    table = md_table(["T", "K", "checkpointing", "s/step (median)", "peak RSS MB", "step adds MB",
                      "autograd nodes", "saved MB"],
                     [[r["T"], r["K"], r["checkpoint_impl"] or "no", r["step_s_median"], r["peak_rss_mb"],
                       r["train_mb"], r["autograd_nodes"], r["saved_mb"]] for r in rows])
    text = (f"### Memory vs sampler steps (tiny SD, 64 px, batch {BATCH}, 1 thread)\n\n{table}\n\n"
            f"checkpointing: exact = the sampler's one-node-per-step checkpoint, torch = torch's "
            f"non-reentrant checkpoint (the fallback).\n\n"
            f"Full-chain backprop with per-step checkpointing, T={t_hi} vs T={t_lo}: peak RSS "
            f"{ratio_total:.2f}x, memory added by the step {ratio_train:.2f}x, autograd nodes {ratio_nodes:.2f}x "
            f"(target <= 1.25x: {'met' if ratio_train <= 1.25 else 'NOT met'} on the step's own memory, "
            f"{'met' if ratio_total <= 1.25 else 'NOT met'} on whole-process RSS). With torch's checkpoint: "
            f"step memory {torch_train:.2f}x, autograd nodes {torch_nodes:.2f}x.\n")
    write_markdown("memory", text)
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(t_values, [full[t]["train_mb"] for t in t_values], "o-", label="step adds (MB)")
    ax[0].plot(t_values, [full[t]["peak_rss_mb"] for t in t_values], "s--", label="process peak RSS (MB)")
    t_torch = sorted(full_torch)
    ax[0].plot(t_torch, [full_torch[t]["train_mb"] for t in t_torch], "^:", label="step adds, torch checkpoint (MB)")
    ax[0].set_xlabel("sampler steps T (K = T, checkpointed)")
    ax[0].set_ylabel("MB")
    ax[0].legend()
    ax[0].set_title("full-chain backprop, per-step checkpointing")
    for c, mark in ((False, "o-"), (True, "s--")):
        pts = sorted((r["K"], r["train_mb"]) for r in rows if r["T"] == t_sweep and r["checkpoint"] == c
                     and r["checkpoint_impl"] != "torch")
        if c:
            pts = sorted(set(pts) | {(full[t_sweep]["K"], full[t_sweep]["train_mb"])})
        ax[1].plot([p[0] for p in pts], [p[1] for p in pts], mark, label=f"checkpointing={'on' if c else 'off'}")
    ax[1].set_xscale("log")
    ax[1].set_xlabel(f"K (gradient steps of T={t_sweep})")
    ax[1].set_ylabel("MB added by the step")
    ax[1].legend()
    ax[1].set_title("truncation sweep")
    fig.tight_layout()
    fig.savefig(plot_path("memory"), dpi=100)
    print(text)
    return data


if __name__ == "__main__":
    main()
