"""SDXL backend on a tiny random SDXL pipeline saved in diffusers' layout.

References: diffusers' own ``StableDiffusionXLPipeline`` (prompt encoding, time ids, sampling) and
hand-written loops over diffusers' ``EulerDiscreteScheduler.step`` (gradients).
"""
import json
import shutil

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

from backend_helpers import (add_random_lora, assert_grads_close, decode_by_hand, grad_distance,
                             lora_grads, zero_grads)
from nemo_aligner_draft.backends import load_backend
from nemo_aligner_draft.backends import lora_targets
from nemo_aligner_draft.backends.sdxl import SDXLBackend
from nemo_aligner_draft.core.draft import DraftConfig, draft_objective
from nemo_aligner_draft.core.sampler import StepPlan, sample
from nemo_aligner_draft.core.schedulers import EulerRule

PROMPTS = ["a red fox in the snow", "an astronaut riding a horse"]
H, W = 64, 96  # not square, so a swapped (h, w) in the time ids shows
CFG = 5.0


def brightness(images: torch.Tensor) -> torch.Tensor:
    """A simple differentiable reward ``[B]``: mean pixel value in [0, 1]."""
    return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_dir):
    p = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, add_watermarker=False, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


def make_backend(path) -> SDXLBackend:
    backend = load_backend(path)
    backend.set_resolution(H, W)
    return backend


def diffusers_time_ids(pipe, height, width):
    return pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=torch.float32,
                                  text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)


def test_load_backend_detects_sdxl_and_drops_vae_encoder(tiny_sdxl_dir):
    backend = load_backend(tiny_sdxl_dir)
    assert type(backend) is SDXLBackend
    assert isinstance(backend.scheduler, EulerDiscreteScheduler)
    assert isinstance(backend.step_rule(5), EulerRule)
    assert backend.vae.encoder is None
    # default resolution: the UNet's native size in pixels
    n = backend.unet.config.sample_size * backend.vae_scale_factor
    assert backend.time_ids == (n, n, 0, 0, n, n)


def test_conditioning_equals_diffusers_encode_prompt(tiny_sdxl_dir, pipe):
    backend = make_backend(tiny_sdxl_dir)
    cond = backend.encode_prompts(PROMPTS)
    with torch.no_grad():
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True)
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cond.cond["encoder_hidden_states"], embeds, **tol)
    torch.testing.assert_close(cond.cond["added_cond_kwargs"]["text_embeds"], pooled, **tol)
    # force_zeros_for_empty_prompt: diffusers' negative branch is zeros
    assert pipe.config.force_zeros_for_empty_prompt
    torch.testing.assert_close(cond.uncond["encoder_hidden_states"], neg_embeds, **tol)
    torch.testing.assert_close(cond.uncond["added_cond_kwargs"]["text_embeds"], neg_pooled, **tol)
    expected_ids = diffusers_time_ids(pipe, H, W).repeat(len(PROMPTS), 1)
    torch.testing.assert_close(cond.cond["added_cond_kwargs"]["time_ids"], expected_ids)
    torch.testing.assert_close(cond.uncond["added_cond_kwargs"]["time_ids"], expected_ids)


def test_set_resolution_updates_cached_unconditional_time_ids(tiny_sdxl_dir, pipe):
    backend = make_backend(tiny_sdxl_dir)
    backend.encode_prompts(PROMPTS)  # fills the unconditional cache at H×W
    backend.set_resolution(128, 32)
    cond = backend.encode_prompts(PROMPTS)
    expected = diffusers_time_ids(pipe, 128, 32).repeat(len(PROMPTS), 1)
    torch.testing.assert_close(cond.uncond["added_cond_kwargs"]["time_ids"], expected)
    torch.testing.assert_close(cond.cond["added_cond_kwargs"]["time_ids"], expected)


def test_empty_prompt_branch_when_pipeline_does_not_force_zeros(tiny_sdxl_dir, pipe, tmp_path):
    path = str(tmp_path / "sdxl_no_zeros")
    shutil.copytree(tiny_sdxl_dir, path)
    index_file = f"{path}/model_index.json"
    with open(index_file) as f:
        index = json.load(f)
    index["force_zeros_for_empty_prompt"] = False
    with open(index_file, "w") as f:
        json.dump(index, f)
    backend = make_backend(path)
    assert backend.force_zeros_for_empty_prompt is False
    cond = backend.encode_prompts(PROMPTS)
    with torch.no_grad():
        # an explicit "" negative prompt is encoded, never zeroed, by diffusers
        _, neg_embeds, _, neg_pooled = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True,
                                                          negative_prompt=["", ""])
    assert neg_embeds.abs().max() > 0
    torch.testing.assert_close(cond.uncond["encoder_hidden_states"], neg_embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cond.uncond["added_cond_kwargs"]["text_embeds"], neg_pooled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps", [4, 10])
def test_sampling_equals_diffusers_sdxl_pipeline(tiny_sdxl_dir, pipe, steps):
    backend = make_backend(tiny_sdxl_dir)
    noise = torch.randn(len(PROMPTS), 4, H // 8, W // 8, generator=torch.Generator().manual_seed(3))
    rule = backend.step_rule(steps)
    with torch.no_grad():
        ours = sample(backend.denoiser(backend.encode_prompts(PROMPTS), CFG), rule,
                      noise * rule.init_noise_sigma(), StepPlan.no_grad(steps)).latents
        theirs = pipe(PROMPTS, height=H, width=W, latents=noise.clone(), output_type="latent",
                      guidance_scale=CFG, num_inference_steps=steps).images
    # latents have std ≈ 5 here; float32 round-off between two orders of the same operations
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_vae_kept_in_fp32_and_decodes_in_fp32_when_force_upcast(tiny_sdxl_dir):
    low = load_backend(tiny_sdxl_dir, frozen_dtype=torch.bfloat16)
    full = load_backend(tiny_sdxl_dir)
    assert low.vae.config.force_upcast
    assert low.vae.dtype == torch.float32
    assert low.text_encoders[0].dtype == torch.bfloat16 and low.text_encoders[1].dtype == torch.bfloat16
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(low.decode(latents), full.decode(latents), rtol=0, atol=1e-6)


def test_sdxl_loader_on_an_sd_directory_names_the_missing_subfolder(tiny_sd_dir):
    with pytest.raises(FileNotFoundError, match="text_encoder_2"):
        load_backend(tiny_sd_dir, family="sdxl")


# --------------------------------------------------------------------------- gradients
GRAD_STEPS = 4


def our_loss(backend, latents, k, checkpoint=False):
    rule = backend.step_rule(GRAD_STEPS)
    loss, _, _ = draft_objective(backend.denoiser(backend.encode_prompts(PROMPTS), CFG), None, rule,
                                 latents * rule.init_noise_sigma(), backend.decode, brightness,
                                 DraftConfig(truncation_steps=k, checkpoint=checkpoint))
    return loss


def explicit_loss(pipe, unet, latents, k):
    """DRaFT-K written out by hand: diffusers' prompt encoding, time ids and Euler step; the last
    ``k`` steps with autograd on; reward on the last step's x̂0."""
    with torch.no_grad():
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True)
    hidden = torch.cat([neg_embeds, embeds])
    added = {"text_embeds": torch.cat([neg_pooled, pooled]),
             "time_ids": diffusers_time_ids(pipe, H, W).repeat(2 * len(PROMPTS), 1)}
    scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(GRAD_STEPS)
    x = latents * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(i >= GRAD_STEPS - k):
            x_in = scheduler.scale_model_input(x, t)
            out = unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
            uncond, cond = out.chunk(2)
            step = scheduler.step(uncond + CFG * (cond - uncond), t, x)
        x, x0 = step.prev_sample, step.pred_original_sample
    return -brightness(decode_by_hand(pipe.vae, x0)).mean()


@pytest.fixture(scope="module")
def lora_backend(tiny_sdxl_dir):
    backend = make_backend(tiny_sdxl_dir)
    add_random_lora(backend, seed=1)
    return backend


def grads_of(backend, loss_fn):
    zero_grads(backend.unet)
    loss = loss_fn()
    loss.backward()
    return float(loss.detach()), lora_grads(backend.unet)


def test_checkpointed_full_chain_grads_equal_plain(lora_backend):
    latents = torch.randn(2, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(5))
    loss_plain, plain = grads_of(lora_backend, lambda: our_loss(lora_backend, latents, GRAD_STEPS))
    loss_ckpt, ckpt = grads_of(lora_backend, lambda: our_loss(lora_backend, latents, GRAD_STEPS, checkpoint=True))
    lora_backend.set_activation_checkpointing(True)
    try:
        loss_act, act = grads_of(lora_backend, lambda: our_loss(lora_backend, latents, GRAD_STEPS))
    finally:
        lora_backend.set_activation_checkpointing(False)
    assert sum(float(g.abs().sum()) for g in plain.values()) > 0
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-6) and loss_act == pytest.approx(loss_plain, rel=1e-6)
    assert_grads_close(ckpt, plain, rtol=1e-4, atol=1e-7)
    assert_grads_close(act, plain, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("k", [1, 2])
def test_truncated_grads_equal_explicit_loop(lora_backend, pipe, k):
    latents = torch.randn(2, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(6))
    loss_ours, ours = grads_of(lora_backend, lambda: our_loss(lora_backend, latents, k))
    loss_ref, ref = grads_of(lora_backend, lambda: explicit_loss(pipe, lora_backend.unet, latents, k))
    assert loss_ours == pytest.approx(loss_ref, rel=1e-5)
    assert_grads_close(ours, ref, rtol=1e-3, atol=1e-6)
    # truncation matters: the full chain's gradient is a different one
    _, full = grads_of(lora_backend, lambda: explicit_loss(pipe, lora_backend.unet, latents, GRAD_STEPS))
    assert grad_distance(ours, full) > 1e-2


def test_only_lora_parameters_receive_gradients(lora_backend):
    latents = torch.randn(2, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(7))
    for m in [lora_backend.unet, lora_backend.vae, *lora_backend.text_encoders]:
        for p in m.parameters():
            p.grad = None
    our_loss(lora_backend, latents, 2).backward()
    with_grad = {n for n, p in lora_backend.unet.named_parameters() if p.grad is not None}
    lora = {n for n, _ in lora_backend.unet.named_parameters() if "lora_" in n}
    assert lora and with_grad == lora
    assert all(float(p.grad.abs().sum()) > 0 for n, p in lora_backend.unet.named_parameters() if n in lora)
    for m in [lora_backend.vae, *lora_backend.text_encoders]:
        assert all(p.grad is None for p in m.parameters())


# --------------------------------------------------------------------------- training
def train_and_evaluate(path, lr: float, train_steps: int = 8):
    """A few DRaFT+ Adam steps on fresh LoRA (B = 0: starts equal to the reference), then the mean
    reward of samples from held-out latents and prompts."""
    torch.manual_seed(0)  # LoRA A initialisation
    backend = make_backend(path)
    params = backend.add_lora(4, 4.0, lora_targets("sd", "sdlora"))
    backend.setup_reference(use_adapters=True)
    optimizer = torch.optim.Adam(params, lr=lr)
    cond = backend.encode_prompts(PROMPTS)
    rule = backend.step_rule(4)
    gen = torch.Generator().manual_seed(0)
    cfg = DraftConfig(truncation_steps=2, kl_coeff=0.01)
    penalties = []
    for _ in range(train_steps):
        latents = backend.initial_latents(len(PROMPTS), H, W, rule, gen)
        loss, metrics, _ = draft_objective(backend.denoiser(cond, CFG), backend.reference_denoiser(cond, CFG),
                                           rule, latents, backend.decode, brightness, cfg)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        penalties.append(float(metrics["kl_penalty"]))
    with torch.no_grad():
        held_out = backend.encode_prompts(["a bowl of fruit", "a city at night", "a mountain lake", "a cat"])
        latents = backend.initial_latents(4, H, W, rule, torch.Generator().manual_seed(1234))
        out = sample(backend.denoiser(held_out, CFG), rule, latents, StepPlan.no_grad(rule.num_steps))
        return float(brightness(backend.decode(out.latents)).mean()), penalties


def test_draftp_training_raises_held_out_reward(tiny_sdxl_dir):
    control, control_pen = train_and_evaluate(tiny_sdxl_dir, lr=0.0)
    trained, trained_pen = train_and_evaluate(tiny_sdxl_dir, lr=1e-2)
    assert control_pen == [0.0] * len(control_pen)  # policy == reference without updates
    assert trained_pen[0] == 0.0 and trained_pen[-1] > 0
    assert trained > control + 0.02, (trained, control)
