"""Real-size DRaFT on a GPU: SD1.5-shaped UNet / VAE / CLIP text encoder with random weights built
from configs (nothing downloaded), 512 px, 50 DDIM steps, CFG 7.5, bf16, LoRA rank 32, micro-batch 1.

Measures peak GPU memory (``torch.cuda.max_memory_allocated``) and seconds per training step for
each ``--configs`` entry (default K = 1, and K = all steps with per-step sampler checkpointing, the
``model.sampler_checkpointing`` key), beside the memory model's prediction (benchmarks/memory_model.py).
``--family sdxl`` does the same with SDXL-base shapes (1024 px by default); ``--family sd3`` with
SD3.5-Medium's (the full MMDiT, T5-XXL with ``--t5-layers`` of its 24 blocks, 512 px, flow ODE, guidance 4.5).
``--algorithm grpo`` measures a GRPO step instead (Flow-GRPO's pickscore_sd3 settings, scaled to one GPU):
a rollout of one group of ``--micro-batch`` samples on the stochastic sampler (eta 0.7) without gradient,
decoded and scored, then one clipped-ratio + β·KL pass (reference: adapters off) per trained step on that
micro-batch and one optimizer step. benchmarks/gpu_check.sh runs the set the issues ask for in one go.

Precision follows what ``trainer.precision=bf16-mixed`` gives the training shell: text encoders and
VAE stored in bf16 (the backend's ``frozen_dtype``), the UNet kept in fp32 with the LoRA in fp32,
and the forward passes under ``torch.autocast(bfloat16)``. ``--unet-dtype bf16`` stores the frozen
UNet base in bf16 instead (what a memory-tight run would want).

Without CUDA it prints a message and exits 0. ``--smoke-cpu`` runs the same code path on the tiny
configs on CPU (for checking the script itself; its numbers are not the benchmark).

Usage: python benchmarks/bench_gpu_realsize.py [--family sd|sdxl|sd3] [--algorithm draftp|grpo]
       [--configs 1,Tc] [--steps 50] [--repeats 3] [--unet-dtype fp32|bf16] [--smoke-cpu]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (BENCH, RESULTS, log, machine_info, md_table, median, write_dir_once, write_json,  # noqa: E402
                    write_markdown)


GUIDANCE = {"sd": 7.5, "sdxl": 7.5, "sd3": 4.5}
GRPO_ETA, GRPO_CLIP, GRPO_KL = 0.7, 1e-4, 0.01  # Flow-GRPO pickscore_sd3 (conf/grpo_sd3.yaml)


def build_backend(real: bool, device, unet_dtype, family: str = "sd", workdir: str = "", t5_layers: int = 24):
    """Real size: the family's published shapes (testing/realsize.py), random weights, saved as a diffusers
    directory under ``workdir`` (fp16 on disk) and loaded through the package's loader, as a run would.
    ``real=False``: the tiny configs (the CPU smoke run): SD's in memory, SD3's saved and loaded."""
    import torch

    from nemo_aligner_draft.backends import load_backend

    frozen = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = workdir or os.path.join(RESULTS, "tmp")
    if real:
        from nemo_aligner_draft.testing.realsize import save_pipeline

        opts = {"t5_layers": t5_layers} if family == "sd3" else {}
        path = os.path.join(base, f"gpu_{family}" + (f"_t5x{t5_layers}" if opts else ""))
        write_dir_once(path, f"the {family} pipeline (random weights, published shapes)",
                    lambda d: save_pipeline(family, d, **opts))
        backend = load_backend(path, frozen_dtype=frozen)
    elif family == "sd3":
        from nemo_aligner_draft.testing.tiny_sd3 import save_tiny_sd3

        path = os.path.join(base, "gpu_smoke_tiny_sd3")
        write_dir_once(path, "the tiny SD3.5 pipeline", lambda d: save_tiny_sd3(d, sd35=True))
        backend = load_backend(path, frozen_dtype=frozen)
    else:
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from nemo_aligner_draft.backends.sd import SDBackend
        from nemo_aligner_draft.testing.tiny import TINY_TEXT, TINY_UNET, TINY_VAE, clip_tokenizer

        torch.manual_seed(0)
        sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
        backend = SDBackend(UNet2DConditionModel(**TINY_UNET), AutoencoderKL(**TINY_VAE),
                            [CLIPTextModel(CLIPTextConfig(**TINY_TEXT))], [clip_tokenizer()], sched,
                            frozen_dtype=frozen)
    backend.net.to(dtype=unet_dtype)
    backend.to(device)
    n_unet = sum(p.numel() for p in backend.net.parameters())
    return backend, n_unet


def _measure(step, warmup: int, repeats: int, label: str):
    """Seconds of each repeated step and the peak GPU memory over them (after the warm-up steps)."""
    import torch

    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        log(f"  {label}: step {i + 1}/{repeats} {times[-1]:.2f} s")
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return times, peak


def _optimizer_step(params, opt):
    """Clip to norm 1 (the recipes' gradient_clip_val), step, clear; wait for the GPU so the time is the step's."""
    import torch

    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _drop_adapter(backend, params) -> int:
    """Remove this configuration's adapter so the next one starts from the bare denoiser; returns its size."""
    import torch

    size = sum(p.numel() for p in params)
    backend.net.delete_adapters(backend.net.active_adapters())
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return size


def run_config(backend, k: int, ckpt: bool, steps: int, height: int, rank: int, warmup: int, repeats: int):
    import torch

    from nemo_aligner_draft.backends import lora_targets
    from nemo_aligner_draft.core.draft import DraftConfig, draft_objective

    device = backend.device
    cuda = device.type == "cuda"
    params = backend.add_lora(rank, rank, lora_targets(backend.family, "sdlora"))
    opt = torch.optim.AdamW(params, lr=1e-4)
    backend.set_resolution(height, height)  # before the schedule: a resolution-dependent shift reads it
    rule = backend.step_rule(steps)
    cfg = DraftConfig(truncation_steps=k, kl_coeff=0.0, checkpoint=ckpt)
    g = torch.Generator().manual_seed(0)
    prompts = ["a photograph of an astronaut riding a horse"]

    def score(images):  # differentiable stand-in reward: mean brightness [B]
        return images.float().mean(dim=(1, 2, 3))

    def step():
        cond = backend.encode_prompts(prompts)
        latents = backend.initial_latents(1, height, height, rule, generator=g)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _, _ = draft_objective(backend.denoiser(cond, GUIDANCE[backend.family]), None, rule, latents, backend.decode,
                                         score, cfg, generator=g)
        loss.backward()
        _optimizer_step(params, opt)

    times, peak = _measure(step, warmup, repeats, f"K={k} checkpoint={ckpt}")
    lora = _drop_adapter(backend, params)
    return {"K": k, "checkpoint": ckpt, "step_s": times, "step_s_median": median(times), "peak_gib": peak,
            "lora_params": lora}


def run_grpo(backend, steps: int, height: int, rank: int, micro_batch: int, warmup: int, repeats: int):
    """One GRPO step: a no-grad rollout of one group (``micro_batch`` samples of one prompt) on the stochastic
    sampler, decoded and scored by the stand-in reward, group-relative advantages, then one clipped-ratio +
    β·KL backward per trained step (every step but the last one percent, timestep_fraction 0.99) on the whole
    group and one optimizer step — the order of algorithms/grpo.py, without the Lightning shell."""
    import torch

    from nemo_aligner_draft.backends import lora_targets
    from nemo_aligner_draft.core.ddpo import ddpo_rollout
    from nemo_aligner_draft.core.grpo import GRPOConfig, group_advantages, grpo_step_loss

    device = backend.device
    cuda = device.type == "cuda"
    params = backend.add_lora(rank, 2 * rank, lora_targets(backend.family, "sdlora"))  # r32 / alpha 64
    backend.setup_reference(use_adapters=True)  # the reference: the same network with its adapters off
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=1e-4)
    backend.set_resolution(height, height)
    rule = backend.step_rule(steps)
    cfg = GRPOConfig(group_size=micro_batch, train_micro_batch_size=micro_batch, timestep_fraction=0.99,
                     clip_range=GRPO_CLIP, kl_coeff=GRPO_KL)
    trained = max(1, int(steps * cfg.timestep_fraction))
    w = GUIDANCE[backend.family]
    g = torch.Generator().manual_seed(0)
    prompts = ["a photograph of an astronaut riding a horse"] * micro_batch

    def step():
        cond = backend.encode_prompts(prompts)
        latents = backend.initial_latents(micro_batch, height, height, rule, generator=g)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            ro = ddpo_rollout(backend.denoiser(cond, w), rule, latents, GRPO_ETA, generator=g)
            with torch.no_grad():
                rewards = backend.decode(ro.final).float().mean(dim=(1, 2, 3))
        adv = group_advantages(rewards, micro_batch, cfg.global_std).to(ro.log_probs.device)
        idx = torch.arange(micro_batch)
        n = min(trained, ro.num_steps)  # a DDIM schedule ending on alpha_cumprod 1 has a noiseless last step
        for j in range(n):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss, _ = grpo_step_loss(backend.denoiser(cond, w), backend.reference_denoiser(cond, w), rule,
                                         ro.select(idx.to(ro.final.device)), adv, torch.full((micro_batch,), j),
                                         cfg, GRPO_ETA)
            (loss / n).backward()
        _optimizer_step(params, opt)

    times, peak = _measure(step, warmup, repeats, f"GRPO group {micro_batch}, {trained} trained steps")
    lora = _drop_adapter(backend, params)
    return {"algorithm": "grpo", "micro_batch": micro_batch, "trained_steps": trained, "step_s": times,
            "step_s_median": median(times), "peak_gib": peak, "lora_params": lora}


def parse_configs(text: str, steps: int):
    """``"1,50c"`` -> [(1, False), (50, True)]: K, and ``c`` for sampler checkpointing; ``T`` is all steps."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        ckpt = item.endswith("c")
        k = item.rstrip("c")
        out.append((steps if k == "T" else int(k), ckpt))
    return out


def predicted_gib(family, k, steps, height, ckpt, lora, unet_dtype, algorithm="draftp", micro_batch=1,
                  t5_layers=None):
    """The memory model's prediction (benchmarks/memory_model.py, fitted on the family's CPU full-size rows;
    SD1.5's for SDXL)."""
    import json

    import memory_model

    measured = "sd" if family == "sdxl" else family
    with open(os.path.join(BENCH, "results", f"realsize_cpu_{measured}.json")) as f:  # the checked-in CPU rows
        coef = memory_model.fit_rows(json.load(f)["rows"])
    # no reward tower here (the stand-in reward is the mean brightness): reward terms and weights are dropped
    p = memory_model.predict(coef, family, k, steps, micro_batch, height, height, "bf16-mixed", ckpt, lora,
                             unet_dtype, runtime_gib=0.0, reward="pickscore", algorithm=algorithm,
                             t5_layers=t5_layers)
    n_reward = memory_model.param_counts(family)["reward"]
    return p["predicted_gib"] - p.get("reward", 0.0) - n_reward * 2 / memory_model.GIB


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=("sd", "sdxl", "sd3"), default="sd")
    ap.add_argument("--algorithm", choices=("draftp", "grpo"), default="draftp")
    ap.add_argument("--configs", default="1,Tc", help="DRaFT+: comma-separated K values, 'c' = sampler "
                                                      "checkpointing, 'T' = every step (default: 1,Tc)")
    ap.add_argument("--steps", type=int, help="sampler steps (default: 50; 40 for sd3; GRPO rollouts 10)")
    ap.add_argument("--height", type=int, help="default: 512 (sd, sd3), 1024 (sdxl)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--micro-batch", type=int, default=3, help="GRPO: the group sampled and trained on (default 3)")
    ap.add_argument("--t5-layers", type=int, default=24, help="sd3: T5-XXL blocks built (published 24)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--unet-dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--workdir", default="", help="where the random-weight pipeline is written")
    ap.add_argument("--out", default="", help="result name under benchmarks/results "
                                              "(default gpu_realsize[_<family>][_grpo])")
    ap.add_argument("--smoke-cpu", action="store_true", help="tiny configs on CPU: checks the script only")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    a.height = a.height or (1024 if a.family == "sdxl" else 512)
    a.steps = a.steps or (10 if a.algorithm == "grpo" else 40 if a.family == "sd3" else 50)
    if a.smoke_cpu:
        device, real = torch.device("cpu"), False
        a.height, a.steps, a.rank, a.warmup, a.repeats = 64, min(a.steps, 4), 4, 0, 1
        a.micro_batch = min(a.micro_batch, 2)
    elif torch.cuda.is_available():
        device, real = torch.device("cuda"), True
        from nemo_aligner_draft.models.distributed import enable_tf32

        enable_tf32()
    else:
        print("bench_gpu_realsize: no CUDA device here; nothing measured (run it on a GPU machine). "
              "Use --smoke-cpu to check the script on tiny configs.")
        return None
    if a.algorithm == "grpo" and a.micro_batch < 2:
        raise SystemExit("bench_gpu_realsize: --micro-batch must be >= 2 for GRPO (a group)")
    unet_dtype = torch.bfloat16 if a.unet_dtype == "bf16" else torch.float32
    backend, n_unet = build_backend(real, device, unet_dtype, a.family, a.workdir, a.t5_layers)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke run, tiny configs)"
    sampler = "DDIM" if a.family == "sd" else "flow" if a.family == "sd3" else "Euler"
    log(f"device {name}; {a.family} denoiser {n_unet / 1e6:.0f} M params; {a.height} px, {a.steps} {sampler} "
        f"steps, LoRA r{a.rank}, {a.algorithm}")
    t5 = a.t5_layers if a.family == "sd3" else None
    if a.algorithm == "grpo":
        rows = [run_grpo(backend, a.steps, a.height, a.rank, a.micro_batch, a.warmup, a.repeats)]
    else:
        rows = [run_config(backend, k, ckpt, a.steps, a.height, a.rank, a.warmup, a.repeats)
                for k, ckpt in parse_configs(a.configs, a.steps)]
    for r in rows if real else []:
        r["predicted_gib"] = predicted_gib(a.family, r.get("K", 1), a.steps, a.height, r.get("checkpoint", False),
                                           r["lora_params"], a.unet_dtype, a.algorithm, r.get("micro_batch", 1), t5)
        r["prediction_error"] = (r["predicted_gib"] - r["peak_gib"]) / r["peak_gib"]
    data = {"benchmark": "gpu_realsize", "device": name, "machine": machine_info(),
            "settings": {"family": a.family, "algorithm": a.algorithm, "height": a.height, "steps": a.steps,
                         "cfg": GUIDANCE[a.family], "precision": "bf16 autocast", "unet_dtype": a.unet_dtype,
                         "lora_rank": a.rank, "micro_batch": a.micro_batch if a.algorithm == "grpo" else 1,
                         "unet_params": n_unet, "t5_layers": t5, "reward": "mean brightness (no reward tower)",
                         "smoke_cpu": a.smoke_cpu}, "rows": rows}
    suffix = ("" if a.family == "sd" else f"_{a.family}") + ("_grpo" if a.algorithm == "grpo" else "")
    out = a.out or ("gpu_realsize_smoke" if a.smoke_cpu else f"gpu_realsize{suffix}")
    write_json(out, data)
    if a.algorithm == "grpo":
        table = md_table(["group (micro-batch)", "trained steps", "s/step (median)", "peak GiB", "memory model GiB"],
                         [[r["micro_batch"], r["trained_steps"], r["step_s_median"], r["peak_gib"],
                           r.get("predicted_gib", float("nan"))] for r in rows])
    else:
        table = md_table(["K", "sampler checkpointing", "s/step (median)", "peak GiB", "memory model GiB"],
                         [[r["K"], "yes" if r["checkpoint"] else "no", r["step_s_median"], r["peak_gib"],
                           r.get("predicted_gib", float("nan"))] for r in rows])
    shapes = "tiny configs" if a.smoke_cpu else f"{a.family} shapes"
    what = "GRPO" if a.algorithm == "grpo" else "DRaFT+"
    text = (f"### {what} at real size on {name} ({shapes}, {a.height} px, {a.steps} {sampler} steps, "
            f"guidance {GUIDANCE[a.family]}, bf16, LoRA r{a.rank})\n\n{table}\n")
    write_markdown(out, text)
    print(text)
    return data


if __name__ == "__main__":
    main()
