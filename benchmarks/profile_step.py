"""Where the time of one DRaFT-K=1 LoRA training step goes (tiny SD, 64 px, 10 DDIM steps, CFG 7.5,
batch 2, one thread) — the same settings as the peer comparison.

Two views, both written to ``benchmarks/results/profile_step.{json,md}``:
1. phases, timed with ``perf_counter`` over several steps (medians): prompt encoding, the T−K
   sampler steps without gradient, the K steps with gradient, VAE decode, reward, backward,
   optimizer;
2. ``torch.profiler``: the top operators by self CPU time over a few steps.

Usage: python benchmarks/profile_step.py [--repeats 7]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ensure_tiny_sd, log, machine_info, md_table, median, write_json, write_markdown  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from nemo_aligner_draft.backends import load_backend, lora_targets
    from nemo_aligner_draft.core.losses import draftp_loss
    from nemo_aligner_draft.core.sampler import StepPlan, sample

    path = ensure_tiny_sd()
    backend = load_backend(path)
    params = backend.add_lora(4, 4, lora_targets("sd", "sdlora"))
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    rule = backend.step_rule(a.steps)
    g = torch.Generator().manual_seed(0)
    prompts = ["a photo of a cat", "a red bicycle"]
    phases = {k: [] for k in ("encode_prompts", "sample_no_grad_steps", "sample_grad_step", "vae_decode",
                              "reward", "backward", "clip_and_optimizer")}

    def step(record: bool):
        t = [time.perf_counter()]
        cond = backend.encode_prompts(prompts)
        latents = backend.initial_latents(2, 64, 64, rule, generator=g)
        den = backend.denoiser(cond, 7.5)
        t.append(time.perf_counter())
        with torch.no_grad():  # the same split draft_objective makes through StepPlan.last_k(T, 1)
            head = sample(den, _Prefix(rule, a.steps - 1), latents, StepPlan.no_grad(a.steps - 1))
        t.append(time.perf_counter())
        plan = StepPlan([False] * (a.steps - 1) + [True], [False] * a.steps)
        out = _last_step(den, rule, head.latents, plan)
        t.append(time.perf_counter())
        images = backend.decode(out[1])
        t.append(time.perf_counter())
        rewards = images.mean(dim=(1, 2, 3))
        loss, _ = draftp_loss(rewards, [out[0]], [], 0.0)
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        if record:
            for k, (t0, t1) in zip(phases, zip(t[:-1], t[1:])):
                phases[k].append(t1 - t0)
        return t[-1] - t[0]

    def _last_step(den, rule, x, plan):
        from nemo_aligner_draft.core.sampler import model_step

        i = a.steps - 1
        _, eps, x0, _ = model_step(den, rule, x, i, None, 0.0)
        return eps, x0

    log("phase timing")
    step(False)
    totals = [step(True) for _ in range(a.repeats)]
    total = median(totals)
    phase_rows = [[k, median(v), 100 * median(v) / total] for k, v in phases.items()]
    log("torch.profiler")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step(False)
    avgs = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    prof_total = sum(e.self_cpu_time_total for e in avgs)
    ops = [[e.key, e.count, e.self_cpu_time_total / 1e3 / 3, 100 * e.self_cpu_time_total / prof_total]
           for e in avgs[:15]]
    data = {"benchmark": "profile_step", "machine": machine_info(), "step_s_median": total,
            "phases": {k: {"median_s": r[1], "percent": r[2]} for k, r in zip(phases, phase_rows)},
            "top_ops": [{"op": o[0], "calls_per_3_steps": o[1], "self_ms_per_step": o[2], "percent": o[3]}
                        for o in ops]}
    write_json("profile_step", data)
    text = (f"### Profile of one DRaFT-K=1 LoRA step (tiny SD, 64 px, {a.steps} steps, batch 2, 1 thread): "
            f"{total:.3f} s median\n\n" + md_table(["phase", "median s", "% of step"], phase_rows) +
            "\n\nTop operators by self CPU time (torch.profiler, per step):\n\n" +
            md_table(["operator", "calls (3 steps)", "self ms/step", "% of self time"], ops) + "\n")
    write_markdown("profile_step", text)
    print(text)
    return data


class _Prefix:
    """The first ``n`` steps of a step rule (so the no-grad head runs through the real sampler)."""

    def __init__(self, rule, n):
        self._rule, self.timesteps = rule, rule.timesteps[:n]

    def __getattr__(self, name):
        return getattr(self._rule, name)

    @property
    def num_steps(self):
        return int(self.timesteps.shape[0])


if __name__ == "__main__":
    main()
