"""Worker: the floor of a K=1 reward-backprop step — the least work any implementation must do —
written as bare diffusers/torch calls on the very modules our backend loads.

The modules come from ``nemo_aligner_draft.backends.load_backend`` (so the UNet, VAE, text encoder,
tokenizer, scheduler config and the LoRA adapters are exactly those of ``ours_draft.py``); none of the
package's sampling or objective code runs. One step:

1. prompts and the empty prompt through the text encoder (no grad; both ours and trl encode per step),
2. T−1 CFG UNet calls (one batched call of 2·B samples each) and DDIM (eta 0) updates under ``no_grad``,
3. one CFG UNet call with autograd on (wrapped in ``torch.utils.checkpoint`` when ``checkpoint`` is 1,
   as trl's ``pipeline_step_with_grad`` wraps every UNet call), x̂0 from ε,
4. VAE decode of x̂0, mean-brightness reward,
5. backward of −mean reward,
6. gradient-norm clip to 1 and AdamW step (timed separately; included in the floor's total).

Each phase is timed with ``perf_counter`` so the floor can be compared phase by phase.

Standalone: ``argv: pipeline_dir batch steps checkpoint(0/1) warmup repeats height rank targets``;
``ours_draft.py`` also imports :func:`make_floor_step` to time the floor in its own process, on the
modules it has just trained with.
"""
import sys
import time

from _measure import emit, fault_in, one_thread, peak_rss_mb, rss_mb

torch = one_thread()

from torch.utils.checkpoint import checkpoint  # noqa: E402

from nemo_aligner_draft.backends import load_backend  # noqa: E402


PHASES = ("encode", "no_grad_steps", "grad_step", "decode", "reward", "backward", "optimizer")


def make_floor_step(backend, params, opt, batch: int, steps: int, height: int, ckpt: bool, w: float = 7.5):
    """A floor step on ``backend``'s modules. Returns (step(record) -> seconds, phases, rewards): ``phases``
    maps each phase to the seconds of every recorded step."""
    from diffusers import DDIMScheduler

    unet, vae = backend.net, backend.vae
    text_encoder, tokenizer = backend.text_encoders[0], backend.tokenizers[0]
    sched = DDIMScheduler.from_config(backend.scheduler.config)
    sched.set_timesteps(steps)
    timesteps = [int(t) for t in sched.timesteps]
    acp = sched.alphas_cumprod.double()
    final = 1.0 if sched.config.set_alpha_to_one else float(acp[0])
    # per step i: (sqrt ᾱ_t, sqrt(1−ᾱ_t), sqrt ᾱ_prev, sqrt(1−ᾱ_prev)) as python floats
    coef = []
    for i, t in enumerate(timesteps):
        a = float(acp[t])
        a_prev = float(acp[timesteps[i + 1]]) if i + 1 < steps else final
        coef.append((a ** 0.5, (1 - a) ** 0.5, a_prev ** 0.5, (1 - a_prev) ** 0.5))
    prompts = (["a photo of a cat", "a red bicycle"] * (batch // 2 + 1))[:batch]
    g = torch.Generator().manual_seed(0)
    latent_hw = height // (2 ** (len(vae.config.block_out_channels) - 1))
    scaling = vae.config.scaling_factor

    def tokens(texts):
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    with torch.no_grad():  # the empty prompt once, as both implementations cache it
        uncond = text_encoder(tokens([""]))[0]

    def eps_cfg(x, t, emb):
        out_u, out_c = unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample.chunk(2)
        return out_u + w * (out_c - out_u)

    phases = {k: [] for k in PHASES}
    rewards = []

    def step(record: bool = True) -> float:
        marks = [time.perf_counter()]
        with torch.no_grad():
            emb = torch.cat([uncond.expand(batch, -1, -1), text_encoder(tokens(prompts))[0]])
        marks.append(time.perf_counter())
        x = torch.randn(batch, unet.config.in_channels, latent_hw, latent_hw, generator=g)
        with torch.no_grad():
            for i in range(steps - 1):
                sa, s1a, sap, s1ap = coef[i]
                eps = eps_cfg(x, timesteps[i], emb)
                x0 = (x - s1a * eps) / sa
                x = sap * x0 + s1ap * eps
        marks.append(time.perf_counter())
        sa, s1a = coef[steps - 1][:2]
        if ckpt:
            eps = checkpoint(eps_cfg, x, timesteps[steps - 1], emb, use_reentrant=False)
        else:
            eps = eps_cfg(x, timesteps[steps - 1], emb)
        x0 = (x - s1a * eps) / sa
        marks.append(time.perf_counter())
        images = (vae.decode(x0 / scaling).sample / 2 + 0.5).clamp(0, 1)
        marks.append(time.perf_counter())
        r = images.mean(dim=(1, 2, 3))
        loss = -r.mean()
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        rewards.append(float(r.detach().mean()))
        if record:
            for k, a, b in zip(PHASES, marks[:-1], marks[1:]):
                phases[k].append(b - a)
        return marks[-1] - marks[0]

    return step, phases, rewards


def main():
    path, batch, steps, ckpt, warmup, repeats, height, rank, targets = sys.argv[1:10]
    batch, steps, warmup, repeats, height, rank = (int(batch), int(steps), int(warmup), int(repeats), int(height),
                                                   int(rank))
    ckpt = bool(int(ckpt))
    rss_import = rss_mb()
    torch.manual_seed(0)
    backend = load_backend(path)
    params = backend.add_lora(rank, rank, [t for t in targets.split(",") if t])
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    step, phases, rewards = make_floor_step(backend, params, opt, batch, steps, height, ckpt)
    fault_in(backend.net, backend.vae, *backend.text_encoders)
    rss_before, peak_before = rss_mb(), peak_rss_mb()
    for _ in range(warmup):
        step(False)
    times = []
    for i in range(repeats):
        times.append(step(True))
        print(f"  floor: step {i + 1}/{repeats} {times[-1]:.3f} s "
              + " ".join(f"{k} {v[-1]:.2f}" for k, v in phases.items()), file=sys.stderr, flush=True)
    emit({"impl": "floor", "step_s": times, "phases_s": phases, "images_per_step": batch,
          "rss_after_import_mb": rss_import, "rss_before_train_mb": rss_before,
          "peak_rss_before_train_mb": peak_before, "rewards": rewards, "checkpoint": ckpt})


if __name__ == "__main__":
    main()
