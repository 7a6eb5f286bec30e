"""Real-size DRaFT on a GPU: SD1.5-shaped UNet / VAE / CLIP text encoder with random weights built
from configs (nothing downloaded), 512 px, 50 DDIM steps, CFG 7.5, bf16, LoRA rank 32, micro-batch 1.

Measures peak GPU memory (``torch.cuda.max_memory_allocated``) and seconds per training step for
each ``--configs`` entry (default K = 1, and K = all steps with per-step sampler checkpointing, the
``model.sampler_checkpointing`` key), beside the memory model's prediction (benchmarks/memory_model.py).
``--family sdxl`` does the same with SDXL-base shapes (1024 px by default). benchmarks/gpu_check.sh
runs the set the issues ask for in one go.

Precision follows what ``trainer.precision=bf16-mixed`` gives the training shell: text encoder and
VAE stored in bf16 (the backend's ``frozen_dtype``), the UNet kept in fp32 with the LoRA in fp32,
and the forward passes under ``torch.autocast(bfloat16)``. ``--unet-dtype bf16`` stores the frozen
UNet base in bf16 instead (what a memory-tight run would want).

Without CUDA it prints a message and exits 0. ``--smoke-cpu`` runs the same code path on the tiny
configs on CPU (for checking the script itself; its numbers are not the benchmark).

Usage: python benchmarks/bench_gpu_realsize.py [--family sd|sdxl] [--configs 1,Tc] [--steps 50] [--repeats 3]
       [--unet-dtype fp32|bf16] [--smoke-cpu]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import BENCH, RESULTS, log, machine_info, md_table, median, write_json, write_markdown  # noqa: E402


def build_backend(real: bool, device, unet_dtype, family: str = "sd", workdir: str = ""):
    """Real size: the family's published shapes (testing/realsize.py), random weights, saved as a diffusers
    directory under ``workdir`` (fp16 on disk) and loaded through the package's loader, as a run would.
    ``real=False``: the tiny SD configs in memory (the CPU smoke run)."""
    import torch

    frozen = torch.bfloat16 if device.type == "cuda" else torch.float32
    if real:
        from nemo_aligner_draft.backends import load_backend
        from nemo_aligner_draft.testing.realsize import save_pipeline

        path = os.path.join(workdir or os.path.join(RESULTS, "tmp"), f"gpu_{family}")
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            log(f"writing the {family} pipeline (random weights, published shapes) to {path}")
            save_pipeline(family, path)
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


def run_config(backend, k: int, ckpt: bool, steps: int, height: int, rank: int, warmup: int, repeats: int):
    import torch

    from nemo_aligner_draft.backends import lora_targets
    from nemo_aligner_draft.core.draft import DraftConfig, draft_objective

    device = backend.device
    cuda = device.type == "cuda"
    params = backend.add_lora(rank, rank, lora_targets(backend.family, "sdlora"))
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
    backend.net.delete_adapters(backend.net.active_adapters())
    lora = sum(p.numel() for p in params)
    if cuda:
        torch.cuda.empty_cache()
    return {"K": k, "checkpoint": ckpt, "step_s": times, "step_s_median": median(times), "peak_gib": peak,
            "lora_params": lora}


def parse_configs(text: str, steps: int):
    """``"1,50c"`` -> [(1, False), (50, True)]: K, and ``c`` for sampler checkpointing; ``T`` is all steps."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        ckpt = item.endswith("c")
        k = item.rstrip("c")
        out.append((steps if k == "T" else int(k), ckpt))
    return out


def predicted_gib(family, k, steps, height, ckpt, lora, unet_dtype):
    """The memory model's prediction (benchmarks/memory_model.py, fitted on the CPU full-size rows)."""
    import json

    import memory_model

    with open(os.path.join(BENCH, "results", "realsize_cpu_sd.json")) as f:  # the checked-in CPU rows
        coef = memory_model.fit(json.load(f)["rows"][0])
    # no reward tower here (the stand-in reward is the mean brightness): reward terms and weights are dropped
    p = memory_model.predict(coef, family, k, steps, 1, height, height, "bf16-mixed", ckpt, lora, unet_dtype,
                             runtime_gib=0.0, reward="pickscore")
    n_reward = memory_model.param_counts(family)["reward"]
    return p["predicted_gib"] - p["reward"] - n_reward * 2 / memory_model.GIB


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=("sd", "sdxl"), default="sd")
    ap.add_argument("--configs", default="1,Tc", help="comma-separated K values, 'c' = sampler checkpointing, "
                                                      "'T' = every step (default: 1,Tc)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--height", type=int, help="default: 512 (sd), 1024 (sdxl)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--unet-dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--workdir", default="", help="where the random-weight pipeline is written")
    ap.add_argument("--out", default="", help="result name under benchmarks/results (default gpu_realsize[_sdxl])")
    ap.add_argument("--smoke-cpu", action="store_true", help="tiny configs on CPU: checks the script only")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    a.height = a.height or (1024 if a.family == "sdxl" else 512)
    if a.smoke_cpu:
        device, real = torch.device("cpu"), False
        a.height, a.steps, a.rank, a.warmup, a.repeats = 64, min(a.steps, 4), 4, 0, 1
    elif torch.cuda.is_available():
        device, real = torch.device("cuda"), True
        from nemo_aligner_draft.models.distributed import enable_tf32

        enable_tf32()
    else:
        print("bench_gpu_realsize: no CUDA device here; nothing measured (run it on a GPU machine). "
              "Use --smoke-cpu to check the script on tiny configs.")
        return None
    unet_dtype = torch.bfloat16 if a.unet_dtype == "bf16" else torch.float32
    backend, n_unet = build_backend(real, device, unet_dtype, a.family, a.workdir)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke run, tiny configs)"
    log(f"device {name}; {a.family} UNet {n_unet / 1e6:.0f} M params; {a.height} px, {a.steps} DDIM steps, "
        f"LoRA r{a.rank}")
    rows = []
    for k, ckpt in parse_configs(a.configs, a.steps):
        r = run_config(backend, k, ckpt, a.steps, a.height, a.rank, a.warmup, a.repeats)
        if real:
            r["predicted_gib"] = predicted_gib(a.family, k, a.steps, a.height, ckpt, r["lora_params"], a.unet_dtype)
            r["prediction_error"] = (r["predicted_gib"] - r["peak_gib"]) / r["peak_gib"]
        rows.append(r)
    data = {"benchmark": "gpu_realsize", "device": name, "machine": machine_info(),
            "settings": {"family": a.family, "height": a.height, "steps": a.steps, "cfg": 7.5,
                         "precision": "bf16 autocast", "unet_dtype": a.unet_dtype, "lora_rank": a.rank,
                         "micro_batch": 1, "unet_params": n_unet, "reward": "mean brightness (no reward tower)",
                         "smoke_cpu": a.smoke_cpu}, "rows": rows}
    out = a.out or ("gpu_realsize_smoke" if a.smoke_cpu else f"gpu_realsize{'_sdxl' if a.family == 'sdxl' else ''}")
    write_json(out, data)
    table = md_table(["K", "sampler checkpointing", "s/step (median)", "peak GiB", "memory model GiB"],
                     [[r["K"], "yes" if r["checkpoint"] else "no", r["step_s_median"], r["peak_gib"],
                       r.get("predicted_gib", float("nan"))] for r in rows])
    shapes = "tiny configs" if a.smoke_cpu else f"{a.family} shapes"
    text = f"### Real size on {name} ({shapes}, {a.height} px, {a.steps} steps, bf16, LoRA r{a.rank})\n\n{table}\n"
    write_markdown(out, text)
    print(text)
    return data


if __name__ == "__main__":
    main()
