"""Sample efficiency: how many generated samples DRaFT+ needs to reach the reward DDPO ends with.

Model and reward: the embedded pipeline (``nemo_aligner_draft/embedded/assets/sd``) with
``embedded_clip_score`` on the embedded training prompts when the pipeline is there; otherwise the
tiny random SD with the ``brightness`` reward (the result says which). 64 px, 10 DDIM steps, LoRA
r4, one thread. Both methods are driven by the core functions in a plain loop (the same ones the
Lightning shells call):

* DRaFT+: ``core.draft.draft_objective`` (K=1, kl_coeff 0.2, AdamW lr
  3e-3: the first demo setting), ``--batch`` samples per step;
* DDPO: ``core.ddpo`` rollouts of ``--ddpo-samples`` per epoch (eta 1), batch-normalised advantages,
  one inner epoch of PPO-clip over all steps (timestep_fraction 1, gradients of all steps of a
  train batch accumulated before each AdamW step, lr 3e-4 — the DDPO paper's LoRA setting).

Every ``--eval-every`` DDPO epochs and every ``--draft-eval-every`` DRaFT+ steps the policy is evaluated on the same fixed set of prompts and initial
noises with the deterministic sampler (eta 0); evaluation samples are not counted. Result: DDPO's
final evaluation reward, the first DRaFT+ evaluation at or above it, and the ratio of generated
training samples (target >= 25x, AlignProp's published claim). One seed: a single run, not an
interval.

Usage: python benchmarks/bench_sample_efficiency.py [--draft-steps 40] [--ddpo-epochs 40]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ROOT, ensure_tiny_sd, log, machine_info, md_table, plot_path, pyplot,  # noqa: E402
                    write_json, write_markdown)

EMBEDDED_SD = os.path.join(ROOT, "nemo_aligner_draft", "embedded", "assets", "sd")


def setup(seed: int):
    import torch

    from nemo_aligner_draft.backends import load_backend, lora_targets
    from nemo_aligner_draft.rewards import build_reward

    if os.path.isfile(os.path.join(EMBEDDED_SD, "model_index.json")):
        import nemo_aligner_draft.embedded.rewards  # noqa: F401  (registers the embedded rewards)

        path, reward_name, cfg_scale = EMBEDDED_SD, "embedded_clip_score", 3.0
        with open(os.path.join(ROOT, "nemo_aligner_draft", "embedded", "assets", "train_prompts.txt")) as f:
            prompts = [ln.strip() for ln in f if ln.strip()]
    else:
        path, reward_name, cfg_scale = ensure_tiny_sd(), "brightness", 7.5
        prompts = ["a photo of a cat", "a red bicycle", "a house by the sea", "a bowl of fruit"]
    torch.manual_seed(seed)
    backend = load_backend(path)
    params = backend.add_lora(4, 4, lora_targets("sd", "sdlora"))
    backend.setup_reference(use_adapters=True)
    reward = build_reward(reward_name)
    return backend, params, reward, prompts, path, reward_name, cfg_scale


def weight_hashes(path: str) -> dict:
    """sha256 (first 16 hex) of each weights file, so a result names the exact model it ran on."""
    import glob
    import hashlib

    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*", "*.safetensors"))):
        with open(f, "rb") as fh:
            out[os.path.relpath(f, path)] = hashlib.sha256(fh.read()).hexdigest()[:16]
    return out


def evaluator(backend, reward, prompts, cfg_scale, n_eval=8):
    import torch

    from nemo_aligner_draft.core.sampler import StepPlan, sample

    rule = backend.step_rule(10)
    g = torch.Generator().manual_seed(1234)
    eval_prompts = [prompts[(i * 7919) % len(prompts)] for i in range(n_eval)]
    latents = backend.initial_latents(n_eval, 64, 64, rule, generator=g)

    @torch.no_grad()
    def evaluate():
        cond = backend.encode_prompts(eval_prompts)
        out = sample(backend.denoiser(cond, cfg_scale), rule, latents, StepPlan.no_grad(10))
        return float(reward(backend.decode(out.latents), eval_prompts).float().mean())

    return evaluate


def run_draft(a):
    import torch

    from nemo_aligner_draft.core.draft import DraftConfig, draft_objective

    backend, params, reward, prompts, path, reward_name, w = setup(a.seed)
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    rule = backend.step_rule(10)
    evaluate = evaluator(backend, reward, prompts, w)
    g = torch.Generator().manual_seed(a.seed)
    cfg = DraftConfig(truncation_steps=1, kl_coeff=0.2)
    curve = [(0, evaluate())]
    samples = 0
    for step in range(1, a.draft_steps + 1):
        idx = torch.randint(len(prompts), (a.batch,), generator=g).tolist()
        batch = [prompts[i] for i in idx]
        cond = backend.encode_prompts(batch)
        latents = backend.initial_latents(a.batch, 64, 64, rule, generator=g)
        loss, _, _ = draft_objective(backend.denoiser(cond, w), backend.reference_denoiser(cond, w), rule, latents,
                                     backend.decode, lambda im: reward(im, batch).float(), cfg, generator=g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        samples += a.batch
        if step % a.draft_eval_every == 0:
            curve.append((samples, evaluate()))
            log(f"  DRaFT+ step {step}: {samples} samples, eval reward {curve[-1][1]:.4f}")
    return curve, path, reward_name


def run_ddpo(a):
    import torch

    from nemo_aligner_draft.core.ddpo import (DDPOConfig, ddpo_rollout, ddpo_step_loss, iter_train_minibatches)
    from nemo_aligner_draft.core.stat_tracking import batch_advantages

    backend, params, reward, prompts, _, _, w = setup(a.seed)
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)
    rule = backend.step_rule(10)
    evaluate = evaluator(backend, reward, prompts, w)
    g = torch.Generator().manual_seed(a.seed)
    cfg = DDPOConfig()
    curve = [(0, evaluate())]
    samples, tb = 0, a.batch
    for epoch in range(1, a.ddpo_epochs + 1):
        idx = torch.randint(len(prompts), (a.ddpo_samples,), generator=g).tolist()
        batch = [prompts[i] for i in idx]
        cond = backend.encode_prompts(batch)
        latents = backend.initial_latents(a.ddpo_samples, 64, 64, rule, generator=g)
        roll = ddpo_rollout(backend.denoiser(cond, w), rule, latents, cfg.eta, generator=g)
        with torch.no_grad():
            r = reward(backend.decode(roll.final), batch).float()
        adv = batch_advantages(r)
        samples += a.ddpo_samples
        for mb in iter_train_minibatches(a.ddpo_samples, tb, rule.num_steps, cfg.timestep_fraction, generator=g):
            sub = roll.select(mb.indices)
            sub_cond = backend.encode_prompts([batch[i] for i in mb.indices.tolist()])
            den = backend.denoiser(sub_cond, w)
            for j in range(mb.steps.shape[1]):
                loss, _ = ddpo_step_loss(den, rule, sub, adv[mb.indices], mb.steps[:, j], cfg, 1.0)
                (loss / mb.steps.shape[1]).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if epoch % a.eval_every == 0:
            curve.append((samples, evaluate()))
            log(f"  DDPO epoch {epoch}: {samples} samples, eval reward {curve[-1][1]:.4f}")
    return curve


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draft-steps", type=int, default=40)
    ap.add_argument("--ddpo-epochs", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ddpo-samples", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=8, help="DDPO epochs between evaluations")
    ap.add_argument("--draft-eval-every", type=int, default=1,
                    help="DRaFT+ steps between evaluations (the resolution of 'samples to reach')")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    log("DDPO")
    ddpo = run_ddpo(a)
    t1 = time.perf_counter()
    log("DRaFT+")
    draft, path, reward_name = run_draft(a)
    t2 = time.perf_counter()
    target_reward = ddpo[-1][1]
    start = ddpo[0][1]
    reached = next((s for s, r in draft if s > 0 and r >= target_reward), None)
    ddpo_samples = ddpo[-1][0]
    ratio = ddpo_samples / reached if reached else None
    improved = target_reward > start
    max_measurable = ddpo[-1][0] / (a.batch * a.draft_eval_every)
    model = "embedded pipeline" if path == EMBEDDED_SD else "tiny random SD (no embedded pipeline found)"
    data = {"benchmark": "sample_efficiency", "machine": machine_info(), "model": model, "reward": reward_name,
            "weights_sha256": weight_hashes(path), "settings": vars(a), "ddpo_curve": ddpo, "draft_curve": draft, "ddpo_final_reward": target_reward,
            "start_reward": start, "ddpo_improved": improved, "draft_samples_to_reach": reached,
            "ddpo_samples": ddpo_samples, "ratio": ratio, "target_ratio": 25.0,
            "max_measurable_ratio": max_measurable,
            "met": bool(ratio is not None and ratio >= 25 and improved),
            "wall_s": {"ddpo": t1 - t0, "draft": t2 - t1}}
    write_json("sample_efficiency", data)
    if reached is None:
        verdict = f"DRaFT+ did not reach DDPO's final reward within {draft[-1][0]} samples"
    else:
        verdict = (f"DRaFT+ reached DDPO's final reward {target_reward:.4f} after {reached} samples; DDPO used "
                   f"{ddpo_samples}: {ratio:.1f}x fewer (target >= 25x: {'met' if data['met'] else 'NOT met'})")
    verdict += (f". The largest ratio this run can show is {max_measurable:.0f}x (DDPO's {ddpo[-1][0]} samples over "
                f"DRaFT+'s evaluation resolution of {a.batch * a.draft_eval_every} samples)")
    if not improved:
        verdict += f"; note DDPO did not improve on the starting reward {start:.4f}, so the ratio says little"
    table = md_table(["method", "training samples", "eval reward at start", "eval reward at end", "wall s"], [
        ["DDPO (PPO-clip)", ddpo_samples, start, target_reward, t1 - t0],
        ["DRaFT+ (K=1, kl 0.2)", draft[-1][0], draft[0][1], draft[-1][1], t2 - t1]])
    text = (f"### Sample efficiency ({model}, reward `{reward_name}`, 64 px, 10 steps, 1 thread, seed {a.seed})"
            f"\n\n{table}\n\n{verdict}.\n")
    write_markdown("sample_efficiency", text)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([s for s, _ in ddpo], [r for _, r in ddpo], "s--", label="DDPO")
    ax.plot([s for s, _ in draft], [r for _, r in draft], "o-", label="DRaFT+ (K=1)")
    ax.axhline(target_reward, color="gray", lw=0.8)
    ax.set_xlabel("generated training samples")
    ax.set_ylabel(f"eval reward ({reward_name})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(plot_path("sample_efficiency"), dpi=100)
    print(text)
    return data


if __name__ == "__main__":
    main()
