"""Worker: our DRaFT-K (LoRA) training step on a saved pipeline, timed per step.

One step = encode prompts, sample T steps (the last K with gradient), decode x̂0, reward, backward,
clip the gradient norm to 1, AdamW step — the same core calls the Lightning shell
(``algorithms/reward_backprop.py``) makes, without the Trainer around them.

argv: pipeline_dir batch steps K kl_coeff checkpoint(0/1) warmup repeats [height] [lora_rank]
"""
import sys

from _measure import emit, one_thread, rss_mb, timed_steps

torch = one_thread()

from nemo_aligner_draft.backends import load_backend, lora_targets  # noqa: E402
from nemo_aligner_draft.core.draft import DraftConfig, draft_objective  # noqa: E402


def main():
    path, batch, steps, k, kl, ckpt, warmup, repeats = sys.argv[1:9]
    batch, steps, k, warmup, repeats = int(batch), int(steps), int(k), int(warmup), int(repeats)
    height = int(sys.argv[9]) if len(sys.argv) > 9 else 64
    rank = int(sys.argv[10]) if len(sys.argv) > 10 else 4
    kl, ckpt = float(kl), bool(int(ckpt))
    rss_import = rss_mb()
    torch.manual_seed(0)
    backend = load_backend(path)
    # trl's DefaultDDPOStableDiffusionPipeline LoRA: r=4, alpha=4 on to_q/k/v/out.0 ("sdlora").
    params = backend.add_lora(rank, rank, lora_targets("sd", "sdlora"))
    if kl:
        backend.setup_reference(use_adapters=True)
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    prompts = ["a photo of a cat", "a red bicycle"] * (batch // 2 + 1)
    prompts = prompts[:batch]
    cfg = DraftConfig(truncation_steps=k, kl_coeff=kl, checkpoint=ckpt)
    rule = backend.step_rule(steps)
    g = torch.Generator().manual_seed(0)
    w = 7.5

    def score(images):  # mean brightness, images [B,3,H,W] in [0,1] -> [B]
        return images.mean(dim=(1, 2, 3))

    rewards = []

    def step():
        cond = backend.encode_prompts(prompts)
        latents = backend.initial_latents(batch, height, height, rule, generator=g)
        ref = backend.reference_denoiser(cond, w) if kl else None
        loss, metrics, _ = draft_objective(backend.denoiser(cond, w), ref, rule, latents, backend.decode,
                                           score, cfg, generator=g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rewards.append(float(metrics["reward_mean"]))

    times, rss_before, peak_before = timed_steps(step, warmup, repeats, f"ours K={k}")
    emit({"impl": "ours", "step_s": times, "images_per_step": batch, "rss_after_import_mb": rss_import,
          "rss_before_train_mb": rss_before, "peak_rss_before_train_mb": peak_before, "rewards": rewards})


if __name__ == "__main__":
    main()
