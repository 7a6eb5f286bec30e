"""The shipped embedded model is a plain diffusers pipeline: a diffusers user's first try —
``DiffusionPipeline.from_pretrained(dir)`` with no other argument, then calling it — draws images, and
``load_lora_weights`` with the LoRA a training run exports changes them."""
import json

import torch


def _draw(pipe, prompts):
    out = pipe(prompts, num_inference_steps=10, guidance_scale=3.0, output_type="pt",
               generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))])
    return out.images


def test_plain_from_pretrained_draws_and_exported_lora_changes_the_images(tmp_path):
    from diffusers import DiffusionPipeline

    from nemo_aligner_draft.cli.train import main
    from nemo_aligner_draft.embedded import models

    sd = models.pipeline_path()
    pipe = DiffusionPipeline.from_pretrained(sd)
    # every module loads in one dtype: a float16 text encoder beside a float32 UNet cannot run
    dtypes = {name: m.dtype for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    assert set(dtypes.values()) == {torch.float32}, dtypes
    prompts = ["one red circle on a blue background", "two yellow squares on a black background"]
    base = _draw(pipe, prompts)
    assert base.shape == (2, 3, 64, 64) and torch.isfinite(base).all()
    assert base.std() > 0.05, "the base model draws something, not a flat image"

    # a short LoRA run (a large learning rate so two steps move the weights), exported by the trainer
    run = tmp_path / "run"
    assert main(["--config-name=draftp_embedded", f"model.pretrained={sd}", f"exp_manager.explicit_log_dir={run}",
                 "trainer.max_steps=2", "trainer.draftp_sd.max_steps=2", "trainer.draftp_sd.val_check_interval=0",
                 "trainer.draftp_sd.save_interval=2", "model.micro_batch_size=2", "model.global_batch_size=2",
                 "model.optim.lr=0.05", "model.optim.sched.warmup_steps=0",
                 "exp_manager.create_tensorboard_logger=false"]) == 0
    pipe.load_lora_weights(str(run / "export"))
    tuned = _draw(pipe, prompts)
    assert torch.isfinite(tuned).all()
    change = (tuned - base).abs().max().item()
    assert change > 0.05, f"the LoRA did not change the images (max pixel change {change})"
    # the same pipeline with the adapter switched off draws the base images again
    pipe.disable_lora()
    torch.testing.assert_close(_draw(pipe, prompts), base, atol=1e-5, rtol=0)


def test_shipped_transformers_configs_load_as_float32():
    """transformers takes the dtype from config.json: the shipped text encoder and TinyCLIP say float32
    (their weights are stored in float16 and upcast on load)."""
    from transformers import CLIPModel, CLIPTextModel

    from nemo_aligner_draft.embedded import models

    te = CLIPTextModel.from_pretrained(models.pipeline_path(), subfolder="text_encoder")
    clip = CLIPModel.from_pretrained(models.tinyclip_path())
    assert te.dtype == torch.float32 and clip.dtype == torch.float32
    for path in (f"{models.pipeline_path()}/text_encoder/config.json", f"{models.tinyclip_path()}/config.json"):
        assert json.load(open(path)).get("dtype") == "float32", path
