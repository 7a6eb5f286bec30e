"""SD 2.x-style v-prediction: sampler and DRaFT+ penalty on a tiny v-prediction pipeline.

References: diffusers' ``StableDiffusionPipeline`` / ``DDIMScheduler`` / ``EulerDiscreteScheduler``
and a hand-written DRaFT+ loop. The penalty is on the ε implied by v̂ (Salimans & Ho 2022):
ε = √ᾱ·v + √(1−ᾱ)·x, x̂0 = √ᾱ·x − √(1−ᾱ)·v.
"""
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

from backend_helpers import add_random_lora, assert_grads_close, decode_by_hand, lora_grads, zero_grads
from nemo_aligner_draft.backends import load_backend
from nemo_aligner_draft.core.draft import DraftConfig, draft_objective
from nemo_aligner_draft.core.sampler import StepPlan, sample
from nemo_aligner_draft.core.schedulers import EulerRule

PROMPTS = ["a red fox in the snow", "an astronaut riding a horse"]
CFG = 7.5
STEPS = 4


def brightness(images: torch.Tensor) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def pipe(tiny_sd_v_dir):
    p = StableDiffusionPipeline.from_pretrained(tiny_sd_v_dir, safety_checker=None, requires_safety_checker=False,
                                                local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def backend(tiny_sd_v_dir):
    return load_backend(tiny_sd_v_dir)


@pytest.mark.parametrize("steps", [4, 10])
def test_sampler_equals_diffusers_pipeline(backend, pipe, steps):
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    rule = backend.step_rule(steps)
    assert rule.prediction_type == "v_prediction"
    noise = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = sample(backend.denoiser(backend.encode_prompts(PROMPTS), CFG), rule,
                      noise * rule.init_noise_sigma(), StepPlan.no_grad(steps)).latents
        theirs = pipe(PROMPTS, height=64, width=64, latents=noise.clone(), output_type="latent", eta=0.0,
                      guidance_scale=CFG, num_inference_steps=steps).images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_ddim_split_output_returns_implied_eps(backend, pipe):
    rule = backend.step_rule(10)
    gen = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    for i in (0, 5, 9):
        a = pipe.scheduler.alphas_cumprod[rule.timesteps[i]]
        eps, x0 = rule.split_output(v, x, i)
        torch.testing.assert_close(eps, a.sqrt() * v + (1 - a).sqrt() * x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x0, a.sqrt() * x - (1 - a).sqrt() * v, rtol=1e-5, atol=1e-6)


def test_euler_noise_estimate_is_implied_eps_for_v_prediction(pipe):
    """EDM's d = (x − x̂0)/σ, the quantity regularised for SDXL, is the ε implied by v̂; x̂0 is
    diffusers' own Euler x̂0."""
    euler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    rule = EulerRule.from_diffusers(euler, 10)
    euler.set_timesteps(10)
    gen = torch.Generator().manual_seed(2)
    for i, t in enumerate(euler.timesteps):
        x, v = torch.randn(2, 4, 8, 8, generator=gen) * 3, torch.randn(2, 4, 8, 8, generator=gen)
        # float64: d divides by σ (down to 0.03), which would magnify float32 round-off
        d, _ = rule.split_output(v.double(), x.double(), i)
        alpha = 1 / (1 + rule.sigmas[i] ** 2)  # ᾱ of the σ level
        x_in = rule.scale_model_input(x.double(), i)
        torch.testing.assert_close(d, alpha.sqrt() * v.double() + (1 - alpha).sqrt() * x_in, rtol=1e-10, atol=1e-10)
        _, x0 = rule.split_output(v, x, i)
        euler.scale_model_input(x, t)
        torch.testing.assert_close(x0, euler.step(v, t, x).pred_original_sample, rtol=1e-5, atol=1e-5)


def explicit_draftp(pipe, unet, latents, k, kl_coeff):
    """DRaFT+ by hand: diffusers' prompt encoding and DDIM step, CFG-combined v̂ of policy (adapters on)
    and reference (adapters off) on the same x, penalty on the implied ε, reward on the last x̂0."""
    with torch.no_grad():
        embeds, neg_embeds = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    hidden = torch.cat([neg_embeds, embeds])
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)

    def guided_v(x, t):
        uncond, cond = unet(torch.cat([x, x]), t, encoder_hidden_states=hidden).sample.chunk(2)
        return uncond + CFG * (cond - uncond)

    x, penalties = latents, []
    for i, t in enumerate(scheduler.timesteps):
        with_grad = i >= STEPS - k
        with torch.set_grad_enabled(with_grad):
            v = guided_v(x, t)
            step = scheduler.step(v, t, x, eta=0.0)
        if with_grad:
            with torch.no_grad():
                unet.disable_adapters()
                v_ref = guided_v(x, t)
                unet.enable_adapters()
            a = scheduler.alphas_cumprod[t]
            eps = a.sqrt() * v + (1 - a).sqrt() * x
            eps_ref = a.sqrt() * v_ref + (1 - a).sqrt() * x.detach()
            penalties.append(((eps - eps_ref) ** 2).mean())
        x, x0 = step.prev_sample, step.pred_original_sample
    penalty = torch.stack(penalties).mean()
    rewards = brightness(decode_by_hand(pipe.vae, x0))
    return -rewards.mean() + kl_coeff * penalty, penalty


@pytest.mark.parametrize("k", [1, 2])
def test_draftp_penalty_and_gradients_equal_explicit_loop(tiny_sd_v_dir, pipe, k):
    backend = load_backend(tiny_sd_v_dir)
    add_random_lora(backend, seed=3)  # policy ≠ reference, so the penalty is not zero
    backend.setup_reference(use_adapters=True)
    cond = backend.encode_prompts(PROMPTS)
    rule = backend.step_rule(STEPS)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    kl_coeff = 0.5

    zero_grads(backend.unet)
    loss, metrics, _ = draft_objective(backend.denoiser(cond, CFG), backend.reference_denoiser(cond, CFG), rule,
                                       latents, backend.decode, brightness,
                                       DraftConfig(truncation_steps=k, kl_coeff=kl_coeff))
    loss.backward()
    ours = lora_grads(backend.unet)

    zero_grads(backend.unet)
    ref_loss, ref_penalty = explicit_draftp(pipe, backend.unet, latents, k, kl_coeff)
    ref_loss.backward()
    ref = lora_grads(backend.unet)

    assert float(ref_penalty.detach()) > 1e-4
    assert float(metrics["kl_penalty"]) == pytest.approx(float(ref_penalty.detach()), rel=1e-4)
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    assert_grads_close(ours, ref, rtol=1e-3, atol=1e-6)
