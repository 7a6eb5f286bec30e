"""SD3 backend on tiny random SD3 pipelines saved in diffusers' layout.

References: diffusers' own ``StableDiffusion3Pipeline`` loaded from the saved directory (prompt encoding,
schedule with and without dynamic shifting, sampling, decoding, ``load_lora_weights``) and, for gradients, a
loop written here over the pipeline's encodings with ``FlowMatchEulerDiscreteScheduler.step``.
"""
import json
import os
import shutil

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from backend_helpers import assert_grads_close, grad_distance
from nemo_aligner_draft.backends import detect_family, load_backend, lora_targets
from nemo_aligner_draft.backends.sd3 import SD3Backend
from nemo_aligner_draft.core.draft import DraftConfig, draft_objective
from nemo_aligner_draft.core.sampler import StepPlan, sample
from nemo_aligner_draft.core.schedulers import FlowMatchRule

PROMPTS = ["a red fox in the snow", "an astronaut riding a horse"]
H, W = 64, 96  # latents 8×12, 4×6 = 24 image tokens; not square, so a swapped (h, w) shows
SEQ = 16  # T5 tokens (the pipeline's max_sequence_length; 256 by default)
CFG = 5.0
STEPS = 4


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    from nemo_aligner_draft.testing.tiny_sd3 import save_tiny_sd3

    return save_tiny_sd3(str(tmp_path_factory.mktemp("tiny_sd3")))


@pytest.fixture(scope="module")
def no_t5_dir(tmp_path_factory):
    from nemo_aligner_draft.testing.tiny_sd3 import save_tiny_sd3

    return save_tiny_sd3(str(tmp_path_factory.mktemp("tiny_sd3_no_t5")), seed=1, with_t5=False)


@pytest.fixture(scope="module")
def dynamic_dir(sd3_dir, tmp_path_factory):
    """The same pipeline with ``use_dynamic_shifting`` in its scheduler config (μ from the image size)."""
    path = str(tmp_path_factory.mktemp("tiny_sd3_dynamic") / "pipe")
    shutil.copytree(sd3_dir, path)
    config_file = os.path.join(path, "scheduler", "scheduler_config.json")
    with open(config_file) as f:
        config = json.load(f)
    config["use_dynamic_shifting"] = True
    with open(config_file, "w") as f:
        json.dump(config, f)
    return path


def load_pipe(path) -> StableDiffusion3Pipeline:
    # a directory saved without T5 has null entries for it, which from_pretrained wants passed explicitly
    with open(os.path.join(path, "model_index.json")) as f:
        no_t5 = json.load(f)["text_encoder_3"][0] is None
    kwargs = dict(text_encoder_3=None, tokenizer_3=None) if no_t5 else {}
    pipe = StableDiffusion3Pipeline.from_pretrained(path, local_files_only=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_backend(path, **kwargs) -> SD3Backend:
    backend = SD3Backend.from_pretrained(path, max_sequence_length=SEQ, **kwargs)
    backend.set_resolution(H, W)
    return backend


def noise(seed=3, batch=2):
    return torch.randn(batch, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


def our_sample(backend, latents, steps=STEPS, cfg=CFG):
    rule = backend.step_rule(steps)
    with torch.no_grad():
        return sample(backend.denoiser(backend.encode_prompts(PROMPTS), cfg), rule,
                      latents * rule.init_noise_sigma(), StepPlan.no_grad(steps)).latents


def pipe_sample(pipe, latents, output_type="latent", steps=STEPS, cfg=CFG, **kwargs):
    kwargs.setdefault("max_sequence_length", SEQ)
    with torch.no_grad():
        return pipe(PROMPTS, height=H, width=W, latents=latents.clone(), num_inference_steps=steps,
                    guidance_scale=cfg, output_type=output_type, **kwargs).images


# --------------------------------------------------------------------------- loading and detection
def test_load_backend_auto_detects_sd3_and_samples_as_the_pipeline_by_default(sd3_dir):
    """family auto → sd3 from model_index.json; the default T5 length (256) and a 2-step sample equal the
    pipeline's defaults."""
    assert detect_family(sd3_dir) == "sd3"
    backend = load_backend(sd3_dir)
    assert type(backend) is SD3Backend and backend.family_spec.name == "sd3"
    assert backend.default_sampler == "flow" and isinstance(backend.step_rule(3), FlowMatchRule)
    assert isinstance(backend.scheduler, FlowMatchEulerDiscreteScheduler)
    assert backend.latent_channels == 16 and backend.vae_scale_factor == 8
    assert backend.vae.encoder is None and backend.t5 is not None
    assert backend.max_sequence_length == 256 and backend.resolution == (64, 64)  # sample_size 8 × 8
    pipe = load_pipe(sd3_dir)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    rule = backend.step_rule(2)
    with torch.no_grad():
        ours = sample(backend.denoiser(backend.encode_prompts(PROMPTS), CFG), rule, latents, StepPlan.no_grad(2))
        theirs = pipe(PROMPTS, latents=latents.clone(), num_inference_steps=2, guidance_scale=CFG,
                      output_type="latent").images
    torch.testing.assert_close(ours.latents, theirs, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- conditioning
@pytest.mark.parametrize("with_t5", [True, False])
def test_conditioning_equals_encode_prompt(sd3_dir, no_t5_dir, with_t5):
    path = sd3_dir if with_t5 else no_t5_dir
    backend, pipe = make_backend(path), load_pipe(path)
    assert (backend.t5 is not None) == with_t5
    cond = backend.encode_prompts(PROMPTS)
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True,
                                                             max_sequence_length=SEQ)
    assert embeds.shape == (2, 77 + SEQ, 96) and pooled.shape == (2, 24 + 40)
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cond.cond["encoder_hidden_states"], embeds, **tol)
    torch.testing.assert_close(cond.cond["pooled_projections"], pooled, **tol)
    torch.testing.assert_close(cond.uncond["encoder_hidden_states"], neg, **tol)
    torch.testing.assert_close(cond.uncond["pooled_projections"], neg_pooled, **tol)
    # the negative branch is the empty prompt encoded (not zeros); T5's part is zeros exactly when T5 is absent
    assert neg[:, :77].abs().max() > 0 and neg_pooled.abs().max() > 0
    t5_part = cond.cond["encoder_hidden_states"][:, 77:]
    assert (t5_part.abs().max() > 0) == with_t5
    # CLIP-L then CLIP-G on features (32 + 48), zero-padded to T5's width 96
    assert cond.cond["encoder_hidden_states"][:, :77, 80:].abs().max() == 0


# --------------------------------------------------------------------------- sampling and decoding
@pytest.mark.parametrize("which", ["t5", "no_t5", "dynamic_shift"])
def test_sampling_and_decoding_equal_the_pipeline(sd3_dir, no_t5_dir, dynamic_dir, which):
    path = {"t5": sd3_dir, "no_t5": no_t5_dir, "dynamic_shift": dynamic_dir}[which]
    backend, pipe = make_backend(path), load_pipe(path)
    latents = noise()
    ours = our_sample(backend, latents)
    theirs = pipe_sample(pipe, latents)
    assert ours.shape == (2, 16, H // 8, W // 8)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    if which == "t5":
        # decoding: the pipeline's own (scaling, shift, postprocess to [0, 1]) on its own sample
        images = pipe_sample(pipe, latents, output_type="pt")
        with torch.no_grad():
            torch.testing.assert_close(backend.decode(ours), images, rtol=1e-5, atol=1e-5)
        assert backend.vae.config.shift_factor == pytest.approx(0.0609)


def test_dynamic_shift_follows_the_resolution(dynamic_dir, sd3_dir):
    dynamic, fixed = make_backend(dynamic_dir), make_backend(sd3_dir)
    rule = dynamic.step_rule(STEPS)
    # μ for 24 image tokens is far from the fixed shift 3: the schedules differ
    assert grad_distance({"t": rule.timesteps}, {"t": fixed.step_rule(STEPS).timesteps}) > 0.05
    dynamic.set_resolution(128, 128)  # 64 image tokens: another μ
    bigger = dynamic.step_rule(STEPS)
    assert not torch.allclose(bigger.timesteps, rule.timesteps)
    with pytest.raises(ValueError, match="set_resolution"):
        dynamic.initial_latents(1, H, W, bigger)
    assert dynamic.initial_latents(1, 128, 128, bigger).shape == (1, 16, 16, 16)
    fixed.initial_latents(1, 128, 128, fixed.step_rule(STEPS))  # the fixed shift does not depend on it


# --------------------------------------------------------------------------- LoRA
def expected_lora_modules(transformer):
    """The SD3 LoRA script's modules, listed from the architecture: each joint block's attention
    projections; the last block (context_pre_only) has no to_add_out, and SD3.5's attn2 is not adapted."""
    names = set()
    for i, block in enumerate(transformer.transformer_blocks):
        for sub in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            if sub == "to_add_out" and block.context_pre_only:
                continue
            names.add(f"transformer_blocks.{i}.attn.{sub}")
    return names


def test_lora_targets_and_zero_init(sd3_dir):
    """On SD3.5's architecture too (RMS q/k norm, a dual-attention block with attn2): adapters exactly on the
    target modules, only their factors trainable, output unchanged until lora_B is nonzero."""
    from peft.tuners.lora import LoraLayer

    from nemo_aligner_draft.testing.tiny_sd3 import build_tiny_sd3_pipeline

    p = build_tiny_sd3_pipeline(seed=2, with_t5=False, sd35=True)
    backend = SD3Backend(p.transformer, p.vae, [p.text_encoder, p.text_encoder_2], [p.tokenizer, p.tokenizer_2],
                         p.scheduler, max_sequence_length=SEQ)
    assert hasattr(backend.net.transformer_blocks[0], "attn2")
    assert backend.net.transformer_blocks[-1].context_pre_only
    cond = backend.encode_prompts(PROMPTS)
    x, t = noise(), backend.step_rule(STEPS).timesteps[1]
    with torch.no_grad():
        before = backend.denoiser(cond, CFG)(x, t)
    params = backend.add_lora(4, 4.0, lora_targets("sd3", "sdlora"))
    adapted = {n for n, m in backend.net.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == expected_lora_modules(backend.net)
    trainable = {n for n, p in backend.net.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in backend.net.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert len(params) == 2 * len(adapted)
    with torch.no_grad():
        torch.testing.assert_close(backend.denoiser(cond, CFG)(x, t), before, rtol=0, atol=0)
        for n, p in backend.net.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
        assert (backend.denoiser(cond, CFG)(x, t) - before).abs().max() > 1e-3


# --------------------------------------------------------------------------- gradients
def brightness(images: torch.Tensor) -> torch.Tensor:
    """A simple differentiable reward ``[B]``: mean pixel value in [0, 1]."""
    return images.mean(dim=(1, 2, 3))


def add_random_lora(backend, seed=1, scale=0.05):
    """LoRA with lora_B drawn at random (not zero), so the gradient reaches lora_A as well as lora_B."""
    backend.add_lora(4, 4.0, lora_targets("sd3", "sdlora"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in backend.net.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def lora_grads(net):
    return {n: p.grad.detach().clone() for n, p in net.named_parameters() if "lora_" in n}


@pytest.fixture(scope="module")
def lora_backend(sd3_dir):
    backend = make_backend(sd3_dir)
    add_random_lora(backend)
    return backend


def our_loss(backend, latents, k, checkpoint=False):
    rule = backend.step_rule(STEPS)
    loss, _, _ = draft_objective(backend.denoiser(backend.encode_prompts(PROMPTS), CFG), None, rule, latents,
                                 backend.decode, brightness, DraftConfig(truncation_steps=k, checkpoint=checkpoint))
    return loss


def pipeline_inputs(pipe):
    """The pipeline's own prompt encoding (negative first, as its CFG batch is laid out) and a fresh copy of
    its scheduler set to STEPS."""
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True,
                                                             max_sequence_length=SEQ)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    return torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled]), scheduler


def explicit_loss(pipe, transformer, latents, k):
    """DRaFT-K written out: the pipeline's prompt encoding, diffusers' flow Euler step, the last ``k`` steps
    with autograd on, the reward on the last step's x̂0 = x − σ·v decoded as the pipeline decodes."""
    hidden, pooled_all, scheduler = pipeline_inputs(pipe)
    x = latents
    for i, t in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(i >= STEPS - k):
            v_u, v_c = transformer(hidden_states=torch.cat([x, x]), timestep=t.expand(2 * len(PROMPTS)),
                                   encoder_hidden_states=hidden, pooled_projections=pooled_all).sample.chunk(2)
            v = v_u + CFG * (v_c - v_u)
            x0 = x - scheduler.sigmas[i] * v
            x = scheduler.step(v, t, x).prev_sample
    vae = pipe.vae
    images = vae.decode(x0 / vae.config.scaling_factor + vae.config.shift_factor).sample
    return -brightness((images / 2 + 0.5).clamp(0, 1)).mean()


def grads_of(net, loss_fn):
    for p in net.parameters():
        p.grad = None
    loss = loss_fn()
    loss.backward()
    return float(loss.detach()), lora_grads(net)


@pytest.mark.parametrize("k", [1, 2])
def test_truncated_grads_equal_explicit_flow_loop(lora_backend, sd3_dir, k):
    pipe = load_pipe(sd3_dir)
    net = lora_backend.net
    latents = noise(seed=6)
    loss_ours, ours = grads_of(net, lambda: our_loss(lora_backend, latents, k))
    loss_ref, ref = grads_of(net, lambda: explicit_loss(pipe, net, latents, k))
    assert sum(float(g.abs().sum()) for g in ours.values()) > 0
    assert loss_ours == pytest.approx(loss_ref, rel=1e-5)
    assert_grads_close(ours, ref, rtol=1e-3, atol=1e-6)
    # truncation matters: the full chain's gradient is a different one
    _, full = grads_of(net, lambda: explicit_loss(pipe, net, latents, STEPS))
    assert grad_distance(ours, full) > 1e-2


def test_checkpointed_grads_equal_plain(lora_backend):
    """Per-step checkpointing of the sampler and the transformer's own activation checkpointing give the
    plain loop's gradients (full chain)."""
    net = lora_backend.net
    latents = noise(seed=5)
    loss_plain, plain = grads_of(net, lambda: our_loss(lora_backend, latents, STEPS))
    loss_ckpt, ckpt = grads_of(net, lambda: our_loss(lora_backend, latents, STEPS, checkpoint=True))
    lora_backend.set_activation_checkpointing(True)
    try:
        loss_act, act = grads_of(net, lambda: our_loss(lora_backend, latents, STEPS))
    finally:
        lora_backend.set_activation_checkpointing(False)
    assert sum(float(g.abs().sum()) for g in plain.values()) > 0
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-6) and loss_act == pytest.approx(loss_plain, rel=1e-6)
    assert_grads_close(ckpt, plain, rtol=1e-4, atol=1e-7)
    assert_grads_close(act, plain, rtol=1e-4, atol=1e-7)


def test_draft_lv_with_the_velocity_penalty_equals_an_explicit_flow_computation(lora_backend, sd3_dir):
    """DRaFT-LV on the flow path with DRaFT+'s penalty, against a computation written here: the pipeline's
    prompt encoding, diffusers' scheduler for the no-grad chain, each copy re-noised along the flow path
    x1 = (1 − σ)·x0 + σ·ε at the last step's σ, one CFG transformer call, the reward on x̂0 = x1 − σ·v, and
    the penalty on the CFG-combined velocity against the adapters-off network's."""
    pipe = load_pipe(sd3_dir)
    net = lora_backend.net
    copies, kl, seed = 2, 0.3, 21
    latents = noise(seed=7)
    lora_backend.setup_reference(use_adapters=True)
    cond = lora_backend.encode_prompts(PROMPTS)
    rule = lora_backend.step_rule(STEPS)

    def ours_fn():
        loss, metrics, _ = draft_objective(lora_backend.denoiser(cond, CFG), lora_backend.reference_denoiser(cond, CFG),
                                           rule, latents, lora_backend.decode, brightness,
                                           DraftConfig(lv_copies=copies, kl_coeff=kl),
                                           generator=torch.Generator().manual_seed(seed))
        assert metrics["kl_penalty"] > 0
        return loss

    hidden, pooled_all, scheduler = pipeline_inputs(pipe)

    def velocity(x, t):
        v_u, v_c = net(hidden_states=torch.cat([x, x]), timestep=t.expand(2 * len(PROMPTS)),
                       encoder_hidden_states=hidden, pooled_projections=pooled_all).sample.chunk(2)
        return v_u + CFG * (v_c - v_u)

    def explicit_fn():
        x = latents
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(velocity(x, t), t, x).prev_sample
        g = torch.Generator().manual_seed(seed)
        sigma, t_last = scheduler.sigmas[STEPS - 1], scheduler.timesteps[STEPS - 1]
        per_copy = []
        for _ in range(copies):
            x1 = (1 - sigma) * x + sigma * torch.randn(x.shape, generator=g, dtype=x.dtype)
            v = velocity(x1, t_last)
            net.disable_adapters()
            try:
                with torch.no_grad():
                    v_ref = velocity(x1, t_last)
            finally:
                net.enable_adapters()
            vae = pipe.vae
            images = vae.decode((x1 - sigma * v) / vae.config.scaling_factor + vae.config.shift_factor).sample
            per_copy.append(-brightness((images / 2 + 0.5).clamp(0, 1)).mean() + kl * ((v - v_ref) ** 2).mean())
        assert not torch.allclose(per_copy[0], per_copy[1]), "two copies are two draws"
        return torch.stack(per_copy).mean()

    loss_ours, ours = grads_of(net, ours_fn)
    loss_ref, ref = grads_of(net, explicit_fn)
    assert sum(float(g.abs().sum()) for g in ours.values()) > 0
    assert loss_ours == pytest.approx(loss_ref, rel=1e-5)
    assert_grads_close(ours, ref, rtol=1e-3, atol=1e-6)
    # the penalty is in the gradient: without it the gradient is a different one
    lora_backend.reference_model = None
    _, plain = grads_of(net, lambda: draft_objective(lora_backend.denoiser(cond, CFG), None, rule, latents,
                                                     lora_backend.decode, brightness, DraftConfig(lv_copies=copies),
                                                     generator=torch.Generator().manual_seed(seed))[0])
    assert grad_distance(ours, plain) > 1e-3


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("which,class_name", [("sd", "StableDiffusionPipeline"),
                                              ("sdxl", "StableDiffusionXLPipeline")])
def test_another_familys_directory_with_family_sd3_is_one_clear_line(tiny_sd_dir, tiny_sdxl_dir, which, class_name):
    path = tiny_sd_dir if which == "sd" else tiny_sdxl_dir
    with pytest.raises(ValueError) as e:
        load_backend(path, family="sd3")
    message = str(e.value)
    assert "\n" not in message and path in message and repr(class_name) in message


def test_missing_subfolder_and_bad_settings(sd3_dir, tmp_path):
    path = str(tmp_path / "sd3_no_t5_folder")
    shutil.copytree(sd3_dir, path, ignore=shutil.ignore_patterns("text_encoder_3"))
    with pytest.raises(FileNotFoundError, match=r"lacks the subfolder\(s\) \['text_encoder_3'\]") as e:
        load_backend(path, family="sd3")
    assert path in str(e.value)
    # leaving T5 out on purpose loads the rest (the pipeline's text_encoder_3=None)
    assert SD3Backend.from_pretrained(path, use_t5=False, max_sequence_length=SEQ).t5 is None
    backend = make_backend(sd3_dir)
    with pytest.raises(ValueError, match="flow"):
        backend.step_rule(STEPS, "ddim")
    with pytest.raises(ValueError, match="multiples of 16"):
        backend.set_resolution(72, 64)


# --------------------------------------------------------------------------- export
def test_exported_lora_loads_into_the_pipeline_and_reproduces_our_output(lora_backend, sd3_dir, tmp_path):
    from nemo_aligner_draft.export.lora import export_lora

    out = str(tmp_path / "lora")
    export_lora(lora_backend.net, out, family="sd3")
    pipe = load_pipe(sd3_dir)
    latents = noise(seed=9)
    base = pipe_sample(pipe, latents)
    pipe.load_lora_weights(out)
    theirs = pipe_sample(pipe, latents)
    ours = our_sample(lora_backend, latents)
    assert (theirs - base).abs().max() > 1e-3  # the adapter changes the pipeline's output
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
