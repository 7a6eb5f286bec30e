"""FLUX backend on tiny random FLUX.1-dev / -schnell pipelines saved in diffusers' layout.

References: diffusers' own ``FluxPipeline`` loaded from the saved directory (prompt encoding, packing, schedule,
embedded guidance, true CFG, decoding, ``load_lora_weights``) and, for gradients, a loop written here over the
pipeline's packed latents with ``FlowMatchEulerDiscreteScheduler.step``.
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_calculate_shift

from backend_helpers import assert_grads_close, grad_distance
from nemo_aligner_draft.backends import detect_family, load_backend, lora_targets
from nemo_aligner_draft.backends.flux import FluxBackend, latent_image_ids, pack_latents, unpack_latents
from nemo_aligner_draft.core.draft import DraftConfig, draft_objective
from nemo_aligner_draft.core.sampler import StepPlan, sample
from nemo_aligner_draft.core.schedulers import FlowMatchRule

PROMPTS = ["a red fox in the snow", "an astronaut riding a horse"]
H, W = 64, 96  # latents 8×12, 4×6 = 24 packed tokens; not square, so a swapped (h, w) shows
SEQ = 32  # T5 tokens (the pipeline's max_sequence_length; 512 for the real model)
GUIDANCE = 3.5  # FLUX.1-dev's default embedded guidance


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    from nemo_aligner_draft.testing.tiny_flux import save_tiny_flux

    return save_tiny_flux(str(tmp_path_factory.mktemp("tiny_flux")))


@pytest.fixture(scope="module")
def schnell_dir(tmp_path_factory):
    from nemo_aligner_draft.testing.tiny_flux import save_tiny_flux

    return save_tiny_flux(str(tmp_path_factory.mktemp("tiny_flux_schnell")), seed=1, guidance_embeds=False)


def load_pipe(path) -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(flux_dir):
    return load_pipe(flux_dir)


def make_backend(path, height=H, width=W, **kwargs) -> FluxBackend:
    backend = FluxBackend.from_pretrained(path, max_sequence_length=SEQ, **kwargs)
    backend.set_resolution(height, width)
    return backend


def noise(batch=len(PROMPTS), height=H, width=W, seed=3):
    return torch.randn(batch, 4, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))


def our_sample(backend, latents, steps, guidance, prompts=PROMPTS):
    rule = backend.step_rule(steps)
    with torch.no_grad():
        return sample(backend.denoiser(backend.encode_prompts(prompts), guidance), rule, latents,
                      StepPlan.no_grad(steps)).latents, rule


def pipe_sample(pipe, latents, steps, guidance, height=H, width=W, **kwargs):
    """The pipeline from our unpacked latents; returns its final latents unpacked."""
    with torch.no_grad():
        out = pipe(PROMPTS, latents=pack_latents(latents), num_inference_steps=steps, guidance_scale=guidance,
                   output_type="latent", height=height, width=width, max_sequence_length=SEQ, **kwargs).images
    return unpack_latents(out, height // 8, width // 8)


# --------------------------------------------------------------------------- loading and the pieces
def test_load_backend_detects_flux(flux_dir):
    assert detect_family(flux_dir) == "flux"
    backend = load_backend(flux_dir)
    assert type(backend) is FluxBackend and backend.family_spec.name == "flux"
    assert backend.default_sampler == "flow" and isinstance(backend.step_rule(3), FlowMatchRule)
    assert isinstance(backend.scheduler, FlowMatchEulerDiscreteScheduler)
    assert backend.vae.encoder is None
    assert backend.has_guidance_embeds
    assert backend.latent_channels == 4 and backend.net.config.in_channels == 16
    assert backend.resolution == (1024, 1024)  # the pipeline's default size until set_resolution
    assert backend.max_sequence_length == 512


def test_pack_unpack_and_position_ids_are_the_pipelines(flux_dir):
    x = noise()
    b, c, h, w = x.shape
    packed = pack_latents(x)
    assert packed.shape == (b, (h // 2) * (w // 2), 4 * c)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, b, c, h, w))
    assert torch.equal(unpack_latents(packed, h, w), x)
    assert torch.equal(FluxPipeline._unpack_latents(packed, H, W, 8), x)
    assert torch.equal(latent_image_ids(h, w), FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu",
                                                                                        torch.float32))
    with pytest.raises(ValueError, match="even height and width"):
        pack_latents(torch.zeros(1, 4, 7, 8))


def test_conditioning_equals_diffusers_encode_prompt(flux_dir, pipe):
    backend = make_backend(flux_dir)
    cond = backend.encode_prompts(PROMPTS)
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=SEQ)
    assert cond.cond["encoder_hidden_states"].shape == (2, SEQ, 48) and cond.cond["pooled_projections"].shape == (2, 32)
    torch.testing.assert_close(cond.cond["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.cond["pooled_projections"], pooled, rtol=0, atol=0)
    assert not text_ids.any()  # the text ids our transformer call makes: zeros [L, 3]
    assert embeds[0].sub(embeds[1]).abs().max() > 0  # the two prompts are told apart


# --------------------------------------------------------------------------- sampling against the pipeline
@pytest.mark.parametrize("steps,height,width", [(4, H, W), (10, 128, 64)])
def test_sampling_and_schedule_equal_flux_pipeline(flux_dir, pipe, steps, height, width):
    backend = make_backend(flux_dir, height, width)
    x = noise(height=height, width=width)
    ours, rule = our_sample(backend, x, steps, GUIDANCE)
    theirs = pipe_sample(pipe, x, steps, GUIDANCE, height, width)
    # the pipeline's schedule to the bit: linspace sigmas shifted by μ(image tokens)
    assert torch.equal(rule.timesteps, pipe.scheduler.timesteps)
    assert torch.equal(rule.sigmas.float(), pipe.scheduler.sigmas)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - x).abs().max() > 0.1


def test_schedule_shift_follows_the_resolution(flux_dir):
    """μ grows with the number of image tokens (a wrong sequence length would give another schedule)."""
    backend = make_backend(flux_dir)
    cfg = backend.scheduler.config
    for height, width in [(H, W), (256, 512)]:
        backend.set_resolution(height, width)
        tokens = (height // 16) * (width // 16)
        mu = diffusers_calculate_shift(tokens, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift,
                                       cfg.max_shift)
        ref = FlowMatchEulerDiscreteScheduler.from_config(cfg)
        ref.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=mu)
        assert torch.equal(backend.step_rule(6).timesteps, ref.timesteps)
    small, large = make_backend(flux_dir, H, W).step_rule(6), backend.step_rule(6)
    assert (large.sigmas[1:-1] > small.sigmas[1:-1]).all()


def test_decode_equals_the_pipelines_decode_path(flux_dir, pipe):
    backend = make_backend(flux_dir)
    x = noise(seed=4)
    ours, _ = our_sample(backend, x, 3, GUIDANCE)
    final = {}

    def keep_latents(p, i, t, kwargs):
        final["latents"] = kwargs["latents"]
        return kwargs

    with torch.no_grad():
        images = pipe(PROMPTS, latents=pack_latents(x), num_inference_steps=3, guidance_scale=GUIDANCE, output_type="pt",
                      height=H, width=W, max_sequence_length=SEQ, callback_on_step_end=keep_latents).images
        decoded = backend.decode(ours)
    torch.testing.assert_close(unpack_latents(final["latents"], H // 8, W // 8), ours, rtol=1e-5, atol=1e-5)
    assert decoded.shape == images.shape == (2, 3, H, W)
    torch.testing.assert_close(decoded, images, rtol=1e-5, atol=1e-5)
    assert backend.vae.config.shift_factor == 0.1159 and backend.vae.config.scaling_factor == 0.3611


def test_true_cfg_equals_pipeline_true_cfg_scale(flux_dir, pipe):
    """true_cfg_scale s with the empty negative prompt, on top of the embedded guidance."""
    backend = make_backend(flux_dir, true_cfg_scale=2.0)
    x = noise(seed=5)
    ours, _ = our_sample(backend, x, 4, GUIDANCE)
    theirs = pipe_sample(pipe, x, 4, GUIDANCE, true_cfg_scale=2.0, negative_prompt=["", ""])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    plain, _ = our_sample(make_backend(flux_dir), x, 4, GUIDANCE)
    assert (ours - plain).abs().max() > 1e-3


def test_schnell_samples_at_scale_one_and_refuses_other_scales(schnell_dir):
    backend = make_backend(schnell_dir)
    assert not backend.has_guidance_embeds
    x = noise(seed=6)
    ours, _ = our_sample(backend, x, 4, 1.0)
    theirs = pipe_sample(load_pipe(schnell_dir), x, 4, 1.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no guidance embedding.*must be 1.0, got 3.5") as err:
        backend.denoiser(backend.encode_prompts(PROMPTS), GUIDANCE)
    assert "\n" not in str(err.value) and "unconditional_guidance_scale" in str(err.value)


def test_guidance_scale_reaches_the_dev_transformer(flux_dir):
    backend = make_backend(flux_dir)
    x = noise(seed=7)
    low, _ = our_sample(backend, x, 3, 1.0)
    high, _ = our_sample(backend, x, 3, GUIDANCE)
    assert (low - high).abs().max() > 1e-3


# --------------------------------------------------------------------------- LoRA
def expected_lora_modules(net):
    names = set()
    for i in range(len(net.transformer_blocks)):
        p = f"transformer_blocks.{i}."
        names |= {p + "attn." + m for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                            "add_v_proj", "to_add_out")}
        names |= {p + m for m in ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")}
    for i in range(len(net.single_transformer_blocks)):
        names |= {f"single_transformer_blocks.{i}.attn.{m}" for m in ("to_q", "to_k", "to_v")}
    return names


def randomise_lora_b(net, seed, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def test_lora_adapts_the_intended_modules_and_changes_the_output(flux_dir):
    from peft.tuners.lora import LoraLayer

    backend = make_backend(flux_dir)
    cond = backend.encode_prompts(PROMPTS)
    rule = backend.step_rule(4)
    x = noise(seed=8)
    with torch.no_grad():
        base = backend.denoiser(cond, GUIDANCE)(x, rule.timesteps[1])
    params = backend.add_lora(4, 4.0, lora_targets("flux", "sdlora"))
    net = backend.transformer
    adapted = {n for n, m in net.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == expected_lora_modules(net)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {id(p) for p in params} == {id(p) for p in net.parameters() if p.requires_grad}
    assert not any(p.requires_grad for m in [backend.vae, *backend.text_encoders] for p in m.parameters())
    backend.setup_reference(use_adapters=True)
    with torch.no_grad():
        assert torch.equal(backend.denoiser(cond, GUIDANCE)(x, rule.timesteps[1]), base)  # B = 0
        randomise_lora_b(net, seed=1)
        tuned = backend.denoiser(cond, GUIDANCE)(x, rule.timesteps[1])
        reference = backend.reference_denoiser(cond, GUIDANCE)(x, rule.timesteps[1])
    assert (tuned - base).abs().max() > 1e-3
    torch.testing.assert_close(reference, base, rtol=0, atol=0)


@pytest.fixture(scope="module")
def lora_backend(flux_dir):
    torch.manual_seed(0)
    backend = make_backend(flux_dir)
    backend.add_lora(4, 8.0, lora_targets("flux", "sdlora"))  # alpha ≠ rank: the scale must survive export
    randomise_lora_b(backend.transformer, seed=2)
    return backend


def test_lora_export_loads_into_flux_pipeline(flux_dir, lora_backend, tmp_path):
    from nemo_aligner_draft.export.lora import export_lora

    path = export_lora(lora_backend.transformer, str(tmp_path / "lora"), family="flux")
    pipe = load_pipe(flux_dir)
    pipe.load_lora_weights(os.path.dirname(path))
    x = noise(seed=9)
    ours, _ = our_sample(lora_backend, x, 4, GUIDANCE)
    theirs = pipe_sample(pipe, x, 4, GUIDANCE)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    base = pipe_sample(load_pipe(flux_dir), x, 4, GUIDANCE)
    assert (theirs - base).abs().max() > 1e-3


# --------------------------------------------------------------------------- gradients
GRAD_STEPS = 4


def brightness(images: torch.Tensor) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


def our_loss(backend, latents, k, checkpoint=False):
    rule = backend.step_rule(GRAD_STEPS)
    loss, _, _ = draft_objective(backend.denoiser(backend.encode_prompts(PROMPTS), GUIDANCE), None, rule, latents,
                                 backend.decode, brightness, DraftConfig(truncation_steps=k, checkpoint=checkpoint))
    return loss


def explicit_loss(pipe, transformer, latents, k):
    """DRaFT-K written out on the pipeline's packed latents: its prompt encoding, position ids, schedule and
    Euler step; the last ``k`` steps with autograd on; the reward on the last step's x̂0 = x − σ·v."""
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=SEQ)
    b, c, h, w = latents.shape
    x = FluxPipeline._pack_latents(latents, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    cfg = pipe.scheduler.config
    mu = diffusers_calculate_shift(x.shape[1], cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift,
                                   cfg.max_shift)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / GRAD_STEPS, GRAD_STEPS), mu=mu)
    guidance = torch.full((b,), GUIDANCE)
    for i, t in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(i >= GRAD_STEPS - k):
            v = transformer(hidden_states=x, timestep=t.expand(b) / 1000, guidance=guidance, pooled_projections=pooled,
                            encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=img_ids, return_dict=False)[0]
            x0 = x - scheduler.sigmas[i] * v
            x = scheduler.step(v, t, x).prev_sample
    vae = pipe.vae
    z = FluxPipeline._unpack_latents(x0, H, W, 8) / vae.config.scaling_factor + vae.config.shift_factor
    return -brightness((vae.decode(z).sample / 2 + 0.5).clamp(0, 1)).mean()


def grads_of(net, loss_fn):
    for p in net.parameters():
        p.grad = None
    loss = loss_fn()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in net.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("k", [1, 2])
def test_truncated_grads_equal_explicit_flow_loop(lora_backend, pipe, k):
    net = lora_backend.transformer
    latents = noise(seed=10)
    loss_ours, ours = grads_of(net, lambda: our_loss(lora_backend, latents, k))
    loss_ref, ref = grads_of(net, lambda: explicit_loss(pipe, net, latents, k))
    assert loss_ours == pytest.approx(loss_ref, rel=1e-5)
    assert sum(float(g.abs().sum()) for g in ref.values()) > 0
    assert_grads_close(ours, ref, rtol=1e-3, atol=1e-7)
    # truncation matters: the full chain's gradient is another one
    _, full = grads_of(net, lambda: explicit_loss(pipe, net, latents, GRAD_STEPS))
    assert grad_distance(ours, full) > 1e-2


def test_checkpointed_full_chain_grads_equal_plain(lora_backend):
    """Exact step checkpointing (the denoiser's grad_tensors) gives the plain backward's gradients."""
    net = lora_backend.transformer
    latents = noise(seed=11)
    loss_plain, plain = grads_of(net, lambda: our_loss(lora_backend, latents, GRAD_STEPS))
    den = lora_backend.denoiser(lora_backend.encode_prompts(PROMPTS), GUIDANCE)
    assert {id(t) for t in den.grad_tensors()} == {id(p) for p in net.parameters() if p.requires_grad}
    loss_ckpt, ckpt = grads_of(net, lambda: our_loss(lora_backend, latents, GRAD_STEPS, checkpoint=True))
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-6)
    assert_grads_close(ckpt, plain, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- bad inputs
def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_sd_directory_given_as_flux_names_its_pipeline_class(tiny_sd_dir):
    with pytest.raises(ValueError, match="not a FLUX pipeline.*'StableDiffusionPipeline'") as err:
        load_backend(tiny_sd_dir, family="flux")
    assert tiny_sd_dir in one_line(err)


def test_sd3_directory_given_as_flux_names_its_pipeline_class(tmp_path):
    d = tmp_path / "sd3"
    d.mkdir()
    (d / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ValueError, match="'StableDiffusion3Pipeline'") as err:
        FluxBackend.from_pretrained(str(d))
    one_line(err)


def test_missing_subfolder_and_missing_directory_are_named(flux_dir, tmp_path):
    partial = str(tmp_path / "partial")
    shutil.copytree(flux_dir, partial, ignore=shutil.ignore_patterns("text_encoder_2"))
    with pytest.raises(FileNotFoundError, match=r"lacks the subfolder\(s\) \['text_encoder_2'\]") as err:
        load_backend(partial, family="flux")
    assert partial in one_line(err)
    with pytest.raises(FileNotFoundError, match="not a directory") as err:
        load_backend(str(tmp_path / "nowhere"), family="flux")
    one_line(err)


def test_bad_resolution_and_schedule_mismatch_are_refused(flux_dir):
    backend = make_backend(flux_dir)
    with pytest.raises(ValueError, match="multiple of 16") as err:
        backend.set_resolution(72, 64)
    one_line(err)
    rule = backend.step_rule(3)  # built for H×W
    with pytest.raises(ValueError, match="call set_resolution\\(128, 128\\) before step_rule") as err:
        backend.initial_latents(1, 128, 128, rule)
    one_line(err)
    assert backend.initial_latents(2, H, W, rule).shape == (2, 4, H // 8, W // 8)
    with pytest.raises(ValueError, match="sampler is 'flow'"):
        backend.step_rule(3, "ddim")
