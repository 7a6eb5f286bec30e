"""Worker (runs in the peer venv): trl 0.23.1 ``DDPOTrainer``; one timed unit = ``trainer.step``
= one epoch: sample ``batch`` images (eta 1), reward, one inner epoch of PPO-clip over all steps.

argv: pipeline_dir batch steps warmup repeats workdir
"""
import os
import sys
import warnings

from _measure import emit, one_thread, rss_mb, timed_steps

torch = one_thread()
warnings.filterwarnings("ignore")

from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline  # noqa: E402


def main():
    path, batch, steps, warmup, repeats, workdir = sys.argv[1:7]
    batch, steps, warmup, repeats = int(batch), int(steps), int(warmup), int(repeats)
    rss_import = rss_mb()
    os.makedirs(workdir, exist_ok=True)
    config = DDPOConfig(
        num_epochs=1, sample_num_steps=steps, sample_eta=1.0, sample_guidance_scale=7.5,
        sample_batch_size=batch, sample_num_batches_per_epoch=1, train_batch_size=batch,
        train_gradient_accumulation_steps=1, train_num_inner_epochs=1, train_timestep_fraction=1.0,
        train_learning_rate=3e-4, per_prompt_stat_tracking=False, async_reward_computation=False,
        mixed_precision="no", log_with=None, logdir=workdir, save_freq=10**9,
        project_kwargs={"project_dir": workdir}, seed=0)
    prompts = ["a photo of a cat", "a red bicycle"]
    counter = {"n": 0}

    def prompt_fn():
        counter["n"] += 1
        return prompts[counter["n"] % 2], {}

    def reward_fn(images, prompts_, metadata):  # mean brightness, images [B,3,H,W] in [0,1]
        return images.mean(dim=(1, 2, 3)), {}

    from accelerate import PartialState  # see trl_alignprop.py: trl logs before its Accelerator exists

    PartialState()
    pipeline = DefaultDDPOStableDiffusionPipeline(path, use_lora=True)
    trainer = DDPOTrainer(config, reward_fn, prompt_fn, pipeline)
    state = {"g": 0}

    def step():
        state["g"] = trainer.step(0, state["g"])

    times, rss_before, peak_before = timed_steps(step, warmup, repeats, "trl DDPO")
    emit({"impl": "trl_ddpo", "step_s": times, "images_per_step": batch, "rss_after_import_mb": rss_import,
          "rss_before_train_mb": rss_before, "peak_rss_before_train_mb": peak_before})


if __name__ == "__main__":
    main()
