"""bf16 mixed precision end to end on CPU: ``trainer.precision=bf16-mixed`` (and NeMo-Aligner's
``precision: bf16``) trains the tiny model through the real CLI — finite losses, adapters that move and
stay fp32, validation, the diffusers LoRA export — with the reward's ``rm.fp32`` and the VAE's fp32
upcast (``force_upcast``) honoured inside the bf16 autocast region.

fp16 (``16-mixed``) cannot run on CPU (Lightning refuses it); its loss scaling is tested at the level of
the accumulation window in tests/reliability/test_fp16_scaler.py.
"""
import json
import math
import os

import torch

SEEN = []


def recording_reward():
    """Mean brightness that records, per call, the dtype it was given and whether autocast was on."""
    def reward(images, prompts):
        SEEN.append((images.dtype, torch.is_autocast_enabled("cpu"), torch.is_grad_enabled()))
        return images.float().mean(dim=(1, 2, 3))

    return reward


def _train(tiny_sd_dir, run, precision, extra=()):
    from nemo_aligner_draft.cli.train import main

    SEEN.clear()
    return main(["--config-name=draftp_tiny", f"model.pretrained={tiny_sd_dir}", f"exp_manager.explicit_log_dir={run}",
                 f"trainer.precision={precision}", "trainer.max_steps=3", "trainer.draftp_sd.max_steps=3",
                 "trainer.draftp_sd.val_check_interval=3", "trainer.draftp_sd.save_interval=3",
                 "trainer.draftp_sd.limit_val_batches=1", "model.infer.inference_steps=4", "model.micro_batch_size=2",
                 "model.global_batch_size=2", "model.optim.lr=0.01", "exp_manager.create_tensorboard_logger=false",
                 *extra])


def test_bf16_mixed_trains_validates_and_exports(tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "bf16"
    assert _train(tiny_sd_dir, run, "bf16-mixed", ["rm.name=test_train_bf16:recording_reward", "rm.fp32=true"]) == 0
    metrics = json.load(open(run / "metrics.json"))
    losses = [h["train_loss"] for h in metrics["train"]]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert all(math.isfinite(h["grad_norm"]) and h["grad_norm"] > 0 for h in metrics["train"])
    val = metrics["validation"][-1]
    assert val["rewards_tuned"] and all(math.isfinite(v) for v in val["rewards_tuned"] + val["rewards_base"])
    # training calls (with a graph) ran under autocast outside the reward; rm.fp32 gave the reward fp32
    # images with autocast off
    training = [s for s in SEEN if s[2]]
    assert training and all(dtype == torch.float32 and not autocast for dtype, autocast, _ in training)

    ckpt = [f for f in os.listdir(run / "checkpoints") if f.endswith("-last.ckpt")][0]
    state = torch.load(run / "checkpoints" / ckpt, map_location="cpu", weights_only=False)["state_dict"]
    lora = {k: v for k, v in state.items() if "lora_" in k}
    assert lora and all(v.dtype == torch.float32 for v in lora.values()), "the trained adapters stay fp32"
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if "lora_B" in k), "lora_B moved off zero"

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, local_files_only=True)
    pipe.load_lora_weights(str(run / "export"))  # the export loads in plain diffusers
    with torch.no_grad():
        out = pipe(["a photo of a cat"], num_inference_steps=2, height=64, width=64, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(out).all()


def test_without_rm_fp32_the_reward_runs_in_the_autocast_region(tiny_sd_dir, tmp_path):
    """The control of the rm.fp32 assertion above: the same run without it scores under autocast."""
    assert _train(tiny_sd_dir, tmp_path / "bf16", "bf16-mixed", ["rm.name=test_train_bf16:recording_reward",
                                                                 "trainer.max_steps=1", "trainer.draftp_sd.max_steps=1",
                                                                 "trainer.draftp_sd.val_check_interval=0"]) == 0
    training = [s for s in SEEN if s[2]]
    assert training and all(autocast for _, autocast, _ in training)


def test_nemo_aligner_precision_bf16_is_bf16_mixed(tiny_sd_dir, tmp_path):
    """NeMo-Aligner's draftp_sd.yaml says ``trainer.precision: bf16``; Lightning reads it as bf16-mixed."""
    assert _train(tiny_sd_dir, tmp_path / "nemo", "bf16", ["rm.name=test_train_bf16:recording_reward",
                                                           "trainer.max_steps=1", "trainer.draftp_sd.max_steps=1",
                                                           "trainer.draftp_sd.val_check_interval=0"]) == 0
    assert any(autocast for _, autocast, grad in SEEN if grad)


def test_an_upcast_vae_decodes_in_fp32_inside_autocast(tiny_sdxl_dir, tiny_sd_dir):
    """SDXL's VAE has force_upcast: kept in fp32 under a bf16 run, and its convolutions run in fp32 even
    inside the bf16 autocast region. SD's VAE (no upcast) is stored and run in bf16 there."""
    from nemo_aligner_draft.backends import load_backend

    precision_dtype = torch.bfloat16
    for path, want in ((tiny_sdxl_dir, torch.float32), (tiny_sd_dir, precision_dtype)):
        backend = load_backend(path, frozen_dtype=precision_dtype)
        seen = []
        hook = backend.vae.decoder.conv_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        latents = torch.randn(1, backend.vae.config.latent_channels, 8, 8)
        with torch.autocast("cpu", dtype=precision_dtype):
            images = backend.decode(latents)
        hook.remove()
        assert backend.vae.dtype == want and seen == [want], (path, backend.vae.dtype, seen)
        assert images.dtype == torch.float32 and torch.isfinite(images).all()
