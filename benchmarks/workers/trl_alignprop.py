"""Worker (runs in the peer venv): trl 0.23.1 ``AlignPropTrainer`` with fixed truncation at the last
step (its K=1), LoRA (trl's own r=4/alpha=4 on to_q/k/v/out.0), no mixed precision, timed per
``trainer.step``. trl's ``pipeline_step_with_grad`` (called by the trainer without a
``gradient_checkpoint`` argument, so at its default True) wraps *every* UNet call of the chain in
``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` under ``torch.enable_grad()`` and detaches
the outputs of the steps before the truncation step.

argv: pipeline_dir batch steps warmup repeats workdir [height]

``height``: trl samples at ``unet.config.sample_size * vae_scale_factor`` pixels and has no setting
for it, so the worker sets the UNet's ``sample_size`` config entry (no weight depends on it).
"""
import os
import sys
import warnings

from _measure import emit, fault_in, one_thread, rss_mb, timed_steps

torch = one_thread()
warnings.filterwarnings("ignore")

from trl import AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline  # noqa: E402


def main():
    path, batch, steps, warmup, repeats, workdir = sys.argv[1:7]
    batch, steps, warmup, repeats = int(batch), int(steps), int(warmup), int(repeats)
    height = int(sys.argv[7]) if len(sys.argv) > 7 else None
    rss_import = rss_mb()
    os.makedirs(workdir, exist_ok=True)
    config = AlignPropConfig(
        num_epochs=1, sample_num_steps=steps, sample_eta=0.0, sample_guidance_scale=7.5,
        train_batch_size=batch, mixed_precision="no", truncated_backprop_rand=False,
        truncated_backprop_timestep=steps - 1, log_with=None, logdir=workdir, save_freq=10**9,
        project_kwargs={"project_dir": workdir}, seed=0)
    prompts = ["a photo of a cat", "a red bicycle"]
    counter = {"n": 0}

    def prompt_fn():
        counter["n"] += 1
        return prompts[counter["n"] % 2], {}

    rewards = []

    def reward_fn(images, prompts_, metadata):  # mean brightness, images [B,3,H,W] in [0,1]
        r = images.mean(dim=(1, 2, 3))
        rewards.append(float(r.detach().mean()))
        return r, {}

    # trl logs "no LoRA weights found" through accelerate's logger, which raises unless an accelerate
    # state exists yet (the trainer creates its Accelerator only later).
    from accelerate import PartialState

    PartialState()
    pipeline = DefaultDDPOStableDiffusionPipeline(path, use_lora=True)
    if height is not None:
        sd = pipeline.sd_pipeline
        sd.unet.register_to_config(sample_size=height // sd.vae_scale_factor)
    trainer = AlignPropTrainer(config, reward_fn, prompt_fn, pipeline)
    sd = pipeline.sd_pipeline
    fault_in(sd.unet, sd.vae, sd.text_encoder)
    lora = [p for n, p in sd.unet.named_parameters() if p.requires_grad]
    state = {"g": 0}

    def step():
        # epoch 0 always: trl saves accelerator state whenever epoch % save_freq == 0 and epoch != 0
        state["g"] = trainer.step(0, state["g"])

    times, rss_before, peak_before = timed_steps(step, warmup, repeats, "trl AlignProp K=1")
    emit({"impl": "trl_alignprop", "step_s": times, "images_per_step": batch, "rss_after_import_mb": rss_import,
          "rss_before_train_mb": rss_before, "peak_rss_before_train_mb": peak_before, "rewards": rewards,
          "lora_params": sum(p.numel() for p in lora), "checkpoint": True,
          "height": sd.unet.config.sample_size * sd.vae_scale_factor})


if __name__ == "__main__":
    main()
