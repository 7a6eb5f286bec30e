"""Worker: our DDPO epoch on the core functions (``core/ddpo.py``), the unit trl's ``DDPOTrainer.step``
times: sample ``batch`` images (DDIM eta 1, log-probs stored), reward, batch-normalised advantages,
one inner epoch of PPO-clip over all steps with the gradients of all steps accumulated before one
AdamW step (lr 3e-4, clip 1).

argv: pipeline_dir batch steps warmup repeats
"""
import sys

from _measure import emit, one_thread, rss_mb, timed_steps

torch = one_thread()

from nemo_aligner_draft.backends import load_backend  # noqa: E402
from nemo_aligner_draft.core.ddpo import DDPOConfig, ddpo_rollout, ddpo_step_loss, iter_train_minibatches  # noqa: E402
from nemo_aligner_draft.core.stat_tracking import batch_advantages  # noqa: E402


def main():
    path, batch, steps, warmup, repeats = sys.argv[1:6]
    batch, steps, warmup, repeats = int(batch), int(steps), int(warmup), int(repeats)
    rss_import = rss_mb()
    torch.manual_seed(0)
    backend = load_backend(path)
    # trl's DDPO LoRA (DefaultDDPOStableDiffusionPipeline): r=4, alpha=4 on the attention projections only
    params = backend.add_lora(4, 4, ["to_q", "to_k", "to_v", "to_out.0"])
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=1e-4)
    rule = backend.step_rule(steps)
    cfg = DDPOConfig()
    eta = 1.0  # the sampler's eta (not a DDPOConfig key)
    g = torch.Generator().manual_seed(0)
    prompts = ["a photo of a cat", "a red bicycle"] * (batch // 2 + 1)
    prompts = prompts[:batch]

    def step():
        cond = backend.encode_prompts(prompts)
        den = backend.denoiser(cond, 7.5)
        latents = backend.initial_latents(batch, 64, 64, rule, generator=g)
        roll = ddpo_rollout(den, rule, latents, eta, generator=g)
        with torch.no_grad():
            adv = batch_advantages(backend.decode(roll.final).mean(dim=(1, 2, 3)))
        for mb in iter_train_minibatches(batch, batch, rule.num_steps, cfg.timestep_fraction, generator=g):
            sub = roll.select(mb.indices)
            for j in range(mb.steps.shape[1]):
                loss, _ = ddpo_step_loss(den, rule, sub, adv[mb.indices], mb.steps[:, j], cfg, eta)
                (loss / mb.steps.shape[1]).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    times, rss_before, peak_before = timed_steps(step, warmup, repeats, "ours DDPO")
    emit({"impl": "ours_ddpo", "step_s": times, "images_per_step": batch, "rss_after_import_mb": rss_import,
          "rss_before_train_mb": rss_before, "peak_rss_before_train_mb": peak_before})


if __name__ == "__main__":
    main()
