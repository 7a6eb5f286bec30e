"""The worked example of the model-family registry: a new family is one file (``toy_family.py``: its
backend, whose denoiser is not a UNet and takes its own keyword arguments) plus one registry line; the
registry then recognises its pipeline directory and the unchanged shell trains it."""
import json

import pytest
import torch

from nemo_aligner_draft.backends import FAMILIES, Family, detect_family, load_backend, register_family


@pytest.fixture
def toy_dir(tmp_path):
    from toy_family import save_toy_pipeline

    # the registry line a new family adds
    register_family(Family("toy_film", "toy_family:ToyBackend", ("ToyFiLMPipeline",), pipeline_class=None,
                           lora_targets={"sdlora": ["film_scale", "film_shift"]}, default_sampler="ddim",
                           denoiser_class="ToyDenoiser", denoiser_subfolder="denoiser"))
    yield save_toy_pipeline(str(tmp_path / "toy"))
    del FAMILIES["toy_film"]


def test_registry_recognises_the_toy_pipeline_and_the_backend_samples(toy_dir):
    from nemo_aligner_draft.core.sampler import StepPlan, sample

    assert detect_family(toy_dir) == "toy_film"
    backend = load_backend(toy_dir)
    rule = backend.step_rule(3)
    cond = backend.encode_prompts(["a red cat", "a blue dog"])
    latents = backend.initial_latents(2, 64, 64, rule, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = backend.decode(sample(backend.denoiser(cond, 3.0), rule, latents, StepPlan.no_grad(3)).latents)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()


def test_toy_family_trains_with_lora_through_the_unchanged_shell(toy_dir, tmp_path):
    from nemo_aligner_draft.cli.train import main

    run = tmp_path / "run"
    assert main(["--config-name=draftp_tiny", f"model.pretrained={toy_dir}", f"exp_manager.explicit_log_dir={run}",
                 "trainer.max_steps=3", "trainer.draftp_sd.max_steps=3", "trainer.draftp_sd.val_check_interval=3",
                 "trainer.draftp_sd.save_interval=3", "trainer.draftp_sd.limit_val_batches=1",
                 "model.infer.inference_steps=3", "model.truncation_steps=2", "model.micro_batch_size=2",
                 "model.global_batch_size=2", "model.optim.lr=0.05", "rm.name=brightness",
                 "exp_manager.create_tensorboard_logger=false"]) == 0
    metrics = json.load(open(run / "metrics.json"))
    assert [h["step"] for h in metrics["train"]] == [1, 2, 3]
    val = metrics["validation"][-1]
    assert val["rewards_tuned"] != val["rewards_base"], "the LoRA on the FiLM layers changed the renders"
    ckpt = torch.load(run / "checkpoints" / "step=3-last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"] and all("film_" in k and "lora_" in k for k in ckpt["state_dict"])


def test_unknown_pipeline_class_is_refused_naming_it(tmp_path):
    d = tmp_path / "other"
    d.mkdir()
    (d / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="KandinskyPipeline.*no model family handles"):
        detect_family(str(d))
