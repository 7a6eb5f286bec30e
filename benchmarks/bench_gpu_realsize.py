"""Real-size DRaFT on a GPU: SD1.5-shaped UNet / VAE / CLIP text encoder with random weights built
from configs (nothing downloaded), 512 px, 50 DDIM steps, CFG 7.5, bf16, LoRA rank 32, micro-batch 1.

Measures peak GPU memory (``torch.cuda.max_memory_allocated``) and seconds per training step for
K = 1 and for K = 50 with per-step sampler checkpointing (``DraftConfig(checkpoint=True)``, the
``model.sampler_checkpointing`` key). Targets (issue 9): K=1 within 16 GB, K=50 checkpointed within
40 GB.

Precision follows what ``trainer.precision=bf16-mixed`` gives the training shell: text encoder and
VAE stored in bf16 (the backend's ``frozen_dtype``), the UNet kept in fp32 with the LoRA in fp32,
and the forward passes under ``torch.autocast(bfloat16)``. ``--unet-dtype bf16`` stores the frozen
UNet base in bf16 instead (what a memory-tight run would want).

Without CUDA it prints a message and exits 0. ``--smoke-cpu`` runs the same code path on the tiny
configs on CPU (for checking the script itself; its numbers are not the benchmark).

Usage: python benchmarks/bench_gpu_realsize.py [--steps 50] [--repeats 3] [--unet-dtype fp32|bf16]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import log, machine_info, md_table, median, write_json, write_markdown  # noqa: E402

from nemo_aligner_draft.testing.realsize import SD15_TEXT, SD15_UNET, SD15_VAE  # noqa: E402  (published shapes)


def build_backend(real: bool, device, unet_dtype):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from nemo_aligner_draft.backends.sd import SDBackend
    from nemo_aligner_draft.testing.tiny import TINY_TEXT, TINY_UNET, TINY_VAE, clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(SD15_UNET if real else TINY_UNET))
    vae = AutoencoderKL(**(SD15_VAE if real else TINY_VAE))
    te = CLIPTextModel(CLIPTextConfig(**(SD15_TEXT if real else TINY_TEXT)))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    frozen = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = SDBackend(unet, vae, [te], [clip_tokenizer()], sched, frozen_dtype=frozen)
    unet.to(dtype=unet_dtype)
    backend.to(device)
    n_unet = sum(p.numel() for p in unet.parameters())
    return backend, n_unet


def run_config(backend, k: int, ckpt: bool, steps: int, height: int, rank: int, warmup: int, repeats: int):
    import torch

    from nemo_aligner_draft.backends import lora_targets
    from nemo_aligner_draft.core.draft import DraftConfig, draft_objective

    device = backend.device
    cuda = device.type == "cuda"
    params = backend.add_lora(rank, rank, lora_targets("sd", "sdlora"))
    opt = torch.optim.AdamW(params, lr=1e-4)
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
            loss, _, _ = draft_objective(backend.denoiser(cond, 7.5), None, rule, latents, backend.decode,
                                         score, cfg, generator=g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        log(f"  K={k} checkpoint={ckpt}: step {i + 1}/{repeats} {times[-1]:.2f} s")
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    # remove this configuration's adapter so the next one starts from the bare UNet
    backend.unet.delete_adapters(backend.unet.active_adapters())
    return {"K": k, "checkpoint": ckpt, "step_s": times, "step_s_median": median(times), "peak_gib": peak}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--unet-dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--smoke-cpu", action="store_true", help="tiny configs on CPU: checks the script only")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if a.smoke_cpu:
        device, real = torch.device("cpu"), False
        a.height, a.steps, a.rank, a.warmup, a.repeats = 64, min(a.steps, 4), 4, 0, 1
    elif torch.cuda.is_available():
        device, real = torch.device("cuda"), True
    else:
        print("bench_gpu_realsize: no CUDA device here; nothing measured (run it on a GPU machine). "
              "Use --smoke-cpu to check the script on tiny configs.")
        return None
    unet_dtype = torch.bfloat16 if a.unet_dtype == "bf16" else torch.float32
    backend, n_unet = build_backend(real, device, unet_dtype)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke run, tiny configs)"
    log(f"device {name}; UNet {n_unet / 1e6:.0f} M params; {a.height} px, {a.steps} DDIM steps, LoRA r{a.rank}")
    rows = [run_config(backend, 1, False, a.steps, a.height, a.rank, a.warmup, a.repeats),
            run_config(backend, a.steps, True, a.steps, a.height, a.rank, a.warmup, a.repeats)]
    targets = {1: 16.0, a.steps: 40.0}
    for r in rows:
        r["target_gib"] = targets[r["K"]]
        r["met"] = bool(r["peak_gib"] <= r["target_gib"]) if device.type == "cuda" else None
    data = {"benchmark": "gpu_realsize", "device": name, "machine": machine_info(),
            "settings": {"height": a.height, "steps": a.steps, "cfg": 7.5, "precision": "bf16 autocast",
                         "unet_dtype": a.unet_dtype, "lora_rank": a.rank, "micro_batch": 1,
                         "unet_params": n_unet, "smoke_cpu": a.smoke_cpu}, "rows": rows}
    out = "gpu_realsize_smoke" if a.smoke_cpu else "gpu_realsize"
    write_json(out, data)
    table = md_table(["K", "sampler checkpointing", "s/step (median)", "peak GiB", "target GiB", "met"],
                     [[r["K"], "yes" if r["checkpoint"] else "no", r["step_s_median"], r["peak_gib"],
                       r["target_gib"], r["met"]] for r in rows])
    shapes = "tiny configs" if a.smoke_cpu else "SD1.5 shapes"
    text = f"### Real size on {name} ({shapes}, {a.height} px, {a.steps} steps, bf16, LoRA r{a.rank})\n\n{table}\n"
    write_markdown(out, text)
    print(text)
    return data


if __name__ == "__main__":
    main()
