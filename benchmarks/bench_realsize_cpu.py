"""Full-size DRaFT+ steps on CPU: SD1.5 (or SDXL, SD3.5-Medium, FLUX.1-dev) architecture with random weights,
saved as a diffusers pipeline in fp16 and loaded through the package's own loader, a full-size reward
(PickScore: CLIP ViT-H-14, saved as a HF CLIPModel directory; or ``--reward aesthetic``: CLIP ViT-L/14 and
the LAION MLP head in its released state-dict layout), LoRA rank 32 on sdlora's modules, activation
checkpointing on, micro-batch 1, the family's guidance (SD 7.5 and SD3 4.5 classifier-free; FLUX.1-dev's
3.5 into its guidance embedding), fp32 (CPU has no bf16 autocast worth measuring).

The flow families do not fit in 24 GiB as published: their frozen T5-XXL encoder (4.76 B parameters, 19 GB
in fp32) is built with ``--t5-layers`` blocks (default 1; width and vocabulary as published), and FLUX's
transformer (11.9 B) with ``--depth`` double,single blocks of the published width (e.g. 1,2 of 19,38).
SD3.5-Medium's transformer runs at its full 24 blocks. The memory model adds the left-out weights from the
published parameter counts and scales FLUX's per-block activations to 19 + 38 blocks.

Each configuration runs in its own process (peak RSS is per process) for one training step and
reports, besides seconds per step and the process's peak RSS:

* the resident weights of each component (bytes of its parameters), and
* what each part of the step adds while its graph is alive: RSS (after ``malloc_trim``, so that memory
  freed by temporaries does not count) right after the UNet steps with grad, after decoding, after
  scoring (the forward is complete: every saved activation is alive), and the peak during backward
  (sampled every 2 ms by a thread).

The memory model (``benchmarks/memory_model.py``) is fitted on the smallest configuration and its
predictions for the others are written beside the measurements.

Usage: python benchmarks/bench_realsize_cpu.py [--family sd|sdxl|sd3|flux] [--steps 4] [--configs 256:1,512:1,512:all]
       [--reward pickscore|aesthetic] [--depth 1,2] [--t5-layers 1] [--append]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import TMP, log, machine_info, md_table, run_worker, write_dir_once, write_json, write_markdown  # noqa: E402

GIB = 2**30


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_bytes() -> int:
    """RSS after glibc returns the memory it holds free to the system (``malloc_trim``): close to the
    bytes of live tensors, where plain RSS also counts what earlier, freed temporaries left behind."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: plain RSS
        pass
    return rss_bytes()


class PeakRss:
    """Highest RSS seen by a sampling thread while the block runs."""

    def __init__(self, interval=0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


FLOW = ("sd3", "flux")
GUIDANCE = {"sd": 7.5, "sdxl": 7.5, "sd3": 4.5, "flux": 3.5}


def pipeline_options(family: str, depth: str = "", t5_layers: int = 1) -> dict:
    """What :func:`~nemo_aligner_draft.testing.realsize.save_pipeline` builds for the family here."""
    if family not in FLOW:
        return {}
    opts = {"t5_layers": int(t5_layers)}
    if family == "flux":
        opts["depth"] = tuple(int(n) for n in (depth or "1,2").split(","))
    return opts


def ensure_assets(family: str, reward: str, depth: str = "", t5_layers: int = 1) -> dict:
    from nemo_aligner_draft.testing.realsize import save_pipeline, save_reward_clip

    opts = pipeline_options(family, depth, t5_layers)
    tag = "".join(f"_{k}{'x'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in sorted(opts.items()))
    pipe = os.path.join(TMP, f"realsize_{family}{tag}")
    clip = os.path.join(TMP, f"realsize_clip_{reward}")
    head = os.path.join(TMP, "realsize_aesthetic_head.pth")
    if reward == "aesthetic" and not os.path.isfile(head):
        # LAION's released head is torch.save(model.state_dict()) of its MLP: layers.{0,2,4,6,7}.*
        import torch

        from nemo_aligner_draft.files import atomic_torch_save
        from nemo_aligner_draft.rewards.aesthetic import AestheticHead

        torch.manual_seed(0)
        atomic_torch_save(AestheticHead(768).state_dict(), head)
    write_dir_once(pipe, f"a random {family} pipeline of the published shapes (fp16)",
                   lambda d: save_pipeline(family, d, **opts))
    write_dir_once(clip, f"a random {reward} CLIP backbone (fp16)", lambda d: save_reward_clip(reward, d))
    return {"pipeline": pipe, "clip": clip, "head": head if reward == "aesthetic" else None}


def params_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def child(a) -> dict:
    import torch

    from nemo_aligner_draft.backends import load_backend, lora_targets
    from nemo_aligner_draft.core.draft import DraftConfig, draft_objective
    from nemo_aligner_draft.rewards import build_reward

    torch.set_num_threads(1)
    rss0 = rss_bytes()
    backend = load_backend(a.pipeline, frozen_dtype=torch.float32)
    if a.reward == "aesthetic":  # the MLP head file, and the ViT-L/14 it reads embeddings from
        reward = build_reward("aesthetic", path=a.head, clip_path=a.clip)
    else:
        reward = build_reward(a.reward, path=a.clip)
    reward.freeze()
    family = backend.family
    params = backend.add_lora(a.rank, a.rank, lora_targets(family, "sdlora"))
    backend.set_activation_checkpointing(True)
    opt = torch.optim.AdamW(params, lr=1e-4)
    weights = {"unet": params_bytes(backend.net), "vae": params_bytes(backend.vae),
               "text_encoders": sum(params_bytes(m) for m in backend.text_encoders), "reward": params_bytes(reward),
               "lora": sum(p.numel() * p.element_size() for p in params)}
    net = backend.net.config
    blocks = {"double": int(net.get("num_layers", 0)), "single": int(net.get("num_single_layers", 0))}
    t5 = backend.text_encoders[-1] if family in FLOW else None
    k = a.steps if a.k == "all" else int(a.k)
    backend.set_resolution(a.height, a.height)  # before the schedule: FLUX's shift depends on it
    rule = backend.step_rule(a.steps)
    cfg = DraftConfig(truncation_steps=k, kl_coeff=0.0, checkpoint=a.k == "all")
    g = torch.Generator().manual_seed(0)
    prompts = ["a photograph of an astronaut riding a horse"]
    marks = {}

    def decode(x):
        marks["after_unet"] = live_bytes()
        images = backend.decode(x)
        marks["after_decode"] = live_bytes()
        return images

    def score(images):
        r = reward(images, prompts)
        marks["after_reward"] = live_bytes()
        return r

    before = live_bytes()
    t0 = time.perf_counter()
    cond = backend.encode_prompts(prompts)
    latents = backend.initial_latents(1, a.height, a.height, rule, generator=g)
    loss, _, _ = draft_objective(backend.denoiser(cond, GUIDANCE[family]), None, rule, latents, decode, score, cfg, generator=g)
    t_forward = time.perf_counter() - t0
    with PeakRss() as peak:
        (-loss).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    return {"family": family, "height": a.height, "steps": a.steps, "K": k, "sampler_checkpointing": a.k == "all",
            "activation_checkpointing": True, "micro_batch": 1, "lora_rank": a.rank, "reward": a.reward,
            "guidance": GUIDANCE[family], "blocks": blocks,
            "t5_layers": int(t5.config.num_layers) if t5 is not None else None,
            "step_s": seconds, "forward_s": t_forward, "weights_gib": {n: v / GIB for n, v in weights.items()},
            "rss_gib": {"process_start": rss0 / GIB, "loaded": before / GIB,
                        "after_unet": marks["after_unet"] / GIB, "after_decode": marks["after_decode"] / GIB,
                        "after_reward": marks["after_reward"] / GIB, "backward_peak": peak.peak / GIB},
            "added_gib": {"unet_steps": (marks["after_unet"] - before) / GIB,
                          "decode": (marks["after_decode"] - marks["after_unet"]) / GIB,
                          "reward": (marks["after_reward"] - marks["after_decode"]) / GIB,
                          "backward_peak_over_forward": (peak.peak - marks["after_reward"]) / GIB},
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=("sd", "sdxl", "sd3", "flux"), default="sd")
    ap.add_argument("--steps", type=int, default=4, help="sampler steps T (CPU time grows with T)")
    ap.add_argument("--configs", default="256:1,512:1,512:all", help="height:K list; K=all is the full chain "
                    "with sampler checkpointing")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--reward", default="pickscore", choices=("pickscore", "aesthetic"))
    ap.add_argument("--depth", default="1,2", help="flux: double,single transformer blocks built (published 19,38)")
    ap.add_argument("--t5-layers", type=int, default=1, help="sd3/flux: T5-XXL blocks built (published 24)")
    ap.add_argument("--append", action="store_true", help="add these configurations to the rows already in "
                    "benchmarks/results/realsize_cpu_<family>.json (e.g. to run a large one on its own)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--height", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--k", help=argparse.SUPPRESS)
    ap.add_argument("--pipeline", help=argparse.SUPPRESS)
    ap.add_argument("--clip", help=argparse.SUPPRESS)
    ap.add_argument("--head", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a)))
        return None
    # the random full-size weights are written once, by a process of their own (8 GB it then frees)
    run_worker(sys.executable, "-c", [f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
                                     f"from bench_realsize_cpu import ensure_assets; import json; "
                                     f"print(json.dumps(ensure_assets({a.family!r}, {a.reward!r}, {a.depth!r}, "
                                     f"{a.t5_layers})))"], timeout=3600)
    assets = ensure_assets(a.family, a.reward, a.depth, a.t5_layers)  # now only the paths
    name = f"realsize_cpu_{a.family}"
    previous = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}.json")
    rows = json.load(open(previous))["rows"] if a.append and os.path.isfile(previous) else []
    for spec in a.configs.split(","):
        height, k = spec.split(":")
        log(f"{a.family} {height} px, T={a.steps}, K={k} ({os.path.basename(assets['pipeline'])}): one step in a "
            f"fresh process")
        rows.append(run_worker(sys.executable, os.path.abspath(__file__),
                               ["--child", f"--family={a.family}", f"--steps={a.steps}", f"--height={height}",
                                f"--k={k}", f"--rank={a.rank}", f"--reward={a.reward}",
                                f"--pipeline={assets['pipeline']}", f"--clip={assets['clip']}",
                                *([f"--head={assets['head']}"] if assets["head"] else [])], timeout=7200))
        log(f"  {rows[-1]['step_s']:.0f} s, peak RSS {rows[-1]['peak_rss_gib']:.2f} GiB")
    from memory_model import check_against

    checks = check_against(rows)
    data = {"benchmark": "realsize_cpu", "machine": machine_info(), "rows": rows, "memory_model": checks}
    write_json(name, data)
    table = md_table(["reward", "px", "T", "K", "sampler ckpt", "blocks", "s/step", "weights GiB", "denoiser steps +GiB",
                      "decode +GiB", "reward +GiB", "peak RSS GiB", "model GiB", "model error"],
                     [[r["reward"], r["height"], r["steps"], r["K"], "yes" if r["sampler_checkpointing"] else "no",
                       "+".join(str(v) for v in (r.get("blocks") or {}).values() if v) or "-", r["step_s"],
                       sum(r["weights_gib"].values()), r["added_gib"]["unet_steps"], r["added_gib"]["decode"],
                       r["added_gib"]["reward"], r["peak_rss_gib"], c["predicted_gib"], c["error"]]
                      for r, c in zip(rows, checks["rows"])])
    built = {"sd3": f", T5-XXL built with {a.t5_layers} of 24 blocks",
             "flux": f", transformer built with the depths below of 19 + 38 blocks, T5-XXL with {a.t5_layers} of 24"}
    text = (f"### Full-size {a.family} DRaFT+ step on CPU (fp32, LoRA r{a.rank}, activation checkpointing, "
            f"micro-batch 1, guidance {GUIDANCE[a.family]}{built.get(a.family, '')})\n\n{table}\n\nMemory model fitted on: {checks['fitted_on']}; "
            f"coefficients {checks['coefficients']}.\n")
    write_markdown(name, text)
    print(text)
    return data


if __name__ == "__main__":
    main()
