"""SD 1.x backend against diffusers' own ``StableDiffusionPipeline`` on a tiny random pipeline."""
import os

import pytest
import torch
from diffusers import StableDiffusionPipeline

from backend_helpers import add_random_lora, assert_grads_close, decode_by_hand, lora_grads, zero_grads
from nemo_aligner_draft.backends import load_backend
from nemo_aligner_draft.backends.sd import SDBackend
from nemo_aligner_draft.core.draft import DraftConfig, draft_objective
from nemo_aligner_draft.core.sampler import StepPlan, sample
from nemo_aligner_draft.core.schedulers import DDIMRule

PROMPTS = ["a red fox in the snow", "an astronaut riding a horse"]
CFG = 7.5


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    p = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False,
                                                local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def backend(tiny_sd_dir):
    return load_backend(tiny_sd_dir)


def test_load_backend_detects_sd(backend):
    assert type(backend) is SDBackend
    assert isinstance(backend.step_rule(5), DDIMRule)
    assert backend.vae.encoder is None


@pytest.mark.parametrize("steps", [4, 10])
def test_ddim_sampling_equals_diffusers_pipeline(backend, pipe, steps):
    noise = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    rule = backend.step_rule(steps)
    with torch.no_grad():
        ours = sample(backend.denoiser(backend.encode_prompts(PROMPTS), CFG), rule,
                      noise * rule.init_noise_sigma(), StepPlan.no_grad(steps)).latents
        theirs = pipe(PROMPTS, height=64, width=64, latents=noise.clone(), output_type="latent", eta=0.0,
                      guidance_scale=CFG, num_inference_steps=steps).images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_decode_equals_vae_decode_mapped_to_unit_interval(backend, pipe):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = backend.decode(latents)
        theirs = decode_by_hand(pipe.vae, latents)
    assert ours.shape == (2, 3, 64, 64)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # chunked decoding (vae_batch_size) gives the same images up to batched-conv round-off
    with torch.no_grad():
        torch.testing.assert_close(backend.decode(latents, batch_size=1), ours, rtol=0, atol=1e-5)


def test_activation_checkpointing_keeps_gradients(tiny_sd_dir):
    backend = load_backend(tiny_sd_dir)
    add_random_lora(backend, seed=2)
    cond = backend.encode_prompts(PROMPTS)
    rule = backend.step_rule(3)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))

    def grads():
        zero_grads(backend.unet)
        loss, _, _ = draft_objective(backend.denoiser(cond, CFG), None, rule, latents, backend.decode,
                                     lambda im: im.mean(dim=(1, 2, 3)), DraftConfig(truncation_steps=3))
        loss.backward()
        return lora_grads(backend.unet)

    plain = grads()
    backend.set_activation_checkpointing(True)
    assert backend.unet.down_blocks[1].gradient_checkpointing
    checkpointed = grads()
    backend.set_activation_checkpointing(False)
    assert not backend.unet.down_blocks[1].gradient_checkpointing
    assert sum(float(g.abs().sum()) for g in plain.values()) > 0
    assert_grads_close(checkpointed, plain, rtol=1e-4, atol=1e-7)


def test_load_backend_missing_directory_names_the_path(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_backend(missing)


def test_load_backend_directory_without_model_index_names_the_path(tmp_path):
    bare = tmp_path / "weights_only"
    bare.mkdir()
    (bare / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="weights_only.*model_index.json"):
        load_backend(str(bare))


def test_load_backend_unknown_family(tiny_sd_dir):
    with pytest.raises(ValueError, match="kandinsky"):
        load_backend(tiny_sd_dir, family="kandinsky")
    assert os.path.isfile(os.path.join(tiny_sd_dir, "model_index.json"))
