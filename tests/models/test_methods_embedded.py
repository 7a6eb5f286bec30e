"""Each sibling method raises a held-out reward on the embedded pretrained model beyond a
zero-learning-rate control (issue 5), through the real CLI.

Model: the shipped embedded pipeline (LoRA on its UNet, as the configs do). Reward: ``brightness`` —
chosen because it has headroom on every image of this model (held-out mean 0.39 of 1), so a one-minute
CPU run can show whether a method's update climbs the reward. Measured alternatives, same settings:
``embedded_aesthetic`` (palette fidelity) is near its ceiling on the shipped model (−0.32 of ≈0) and any
drift of the model lowers it — DDPO and SDPO at lr 3e-3 lowered it, AlignProp raised it by only 1.7
standard errors; ``embedded_clip_score`` needs batches of 32 and K=5 to move (DRaFT+ has that test,
``tests/cli/test_train_embedded.py``).

Validation: all 96 held-out prompts (attribute combinations never seen in pretraining or fine-tuning)
from fixed latents. The control is the validation's ``rewards_base``: the base model (LoRA adapters
off) rendered from the same latents, which is exactly what an lr=0 run renders
(``tests/models/test_methods_cli.py::test_zero_lr_run_renders_the_base_images``). Pass: the mean paired
per-image difference is positive and larger than 3 standard errors.
"""
import json

import pytest
import torch

EMBEDDED = ["rm.name=brightness", "model.data.train.dataset_path=builtin:embedded_train",
            "model.data.validation.dataset_path=builtin:embedded_heldout",
            "exp_manager.create_tensorboard_logger=false"]

# name -> (config, loop section, optimizer steps, validate after this many training steps, overrides).
# DDPO/SDPO: a training step is one PPO epoch of 2 optimizer steps (8 samples, or pairs, each), and
# their val_check_interval counts epochs. Validation always renders the 96 held-out prompts.
#
# Robustness (training outcomes differ between machines and an RL run amplifies the difference): each
# setting was run on seeds 1234, 1 and 2 (model.seed, which moves every latent, noise draw and prompt
# order) and, for one seed, with AVX2 kernels forced (ATEN_CPU_CAPABILITY=avx2, MKL/oneDNN capped at
# AVX2) as a stand-in for another CPU. Measured margins, z = mean paired gain / its SE (pass: z > 3):
#   DRaFT-LV   z 8.3 / 12.5 / 9.4  (gain +0.12 / +0.23 / +0.15)
#   AlignProp  z 10.6 / 12.4 / 9.7 (gain +0.16 / +0.27 / +0.14)
#     (both with sdlora on NeMo's six modules, feed-forward included, and NeMo's initialisation; with the
#     earlier attention-only sdlora: DRaFT-LV z 7.6 / 8.2 / 9.8, AlignProp z 8.2 / 8.3 / 8.3, and with
#     AVX2 forced identical to 2 decimals — not rerun with AVX2 since)
#   DDPO       z 18.4 / 19.1 / 10.8 (gain +0.42 / +0.40 / +0.19); seed 1 with AVX2: z 19.6; seed 7: z 13.6
#   SDPO       z 11.8 / 15.5 / 13.1 (gain +0.11 / +0.24 / +0.24); seed 2 with AVX2: z 9.9; seed 7: z 7.4
# Settings that did not hold and were replaced: DDPO with LoRA (rank 4, lr 1e-3, 4 samples per update:
# seed 1 fell, z −10.3; with 16 samples per update seed 1 still fell, z −6.8) and SDPO with 4 pairs per
# update (seed 2: z 0.7). Full fine-tuning with 8 samples per update held on every seed.
RUNS = {
    "DRaFT-LV": ("draftp_embedded", "draftp_sd", 20, 20,
                 ["model.kl_coeff=0.0", "model.lv_copies=2", "model.truncation_steps=1", "model.micro_batch_size=4",
                  "model.global_batch_size=4", "model.optim.lr=0.003", "model.peft.lora_tuning.adapter_dim=4",
                  "model.peft.lora_tuning.network_alpha=4"]),
    "AlignProp": ("alignprop_tiny", "alignprop", 30, 30, ["model.optim.lr=0.001"]),
    "DDPO": ("ddpo_tiny", "ddpo", 30, 15, ["model.peft.peft_scheme=none", "model.optim.lr=0.0003",
                                       "model.micro_batch_size=8", "model.global_batch_size=8",
                                       "model.infer.inference_steps=6", "model.ddpo.num_sample_batches=2",
                                       "model.ddpo.train_micro_batch_size=4", "model.ddpo.clip_range=0.1",
                                       "model.ddpo.timestep_fraction=1.0"]),
    # SDPO fine-tunes the whole UNet: with LoRA (rank 4, lr 1e-3 or 3e-3) the held-out reward moved by
    # less than 0.01 in this budget
    "SDPO": ("sdpo_tiny", "sdpo", 30, 15, ["model.optim.lr=0.0003", "model.peft.peft_scheme=none",
                                       "model.micro_batch_size=8", "model.global_batch_size=8",
                                       "model.infer.inference_steps=4", "model.sdpo.num_sample_batches=2",
                                       "model.sdpo.train_micro_batch_size=4", "model.sdpo.clip_range=0.5",
                                       "model.sdpo.timestep_fraction=1.0", "model.sdpo.eval_steps=[1]"]),
}
HELDOUT = 96


def _micro_batch(extra, config):
    given = [o.split("=", 1)[1] for o in extra if o.startswith("model.micro_batch_size=")]
    return int(given[-1]) if given else {"draftp_embedded": 8}.get(config, 4)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_method_raises_embedded_reward_beyond_zero_lr_control(name, tmp_path):
    from nemo_aligner_draft.cli.train import main
    from nemo_aligner_draft.embedded import models

    config, loop, steps, val_every, extra = RUNS[name]
    run = tmp_path / "run"
    args = [f"--config-name={config}", f"model.pretrained={models.pipeline_path()}",
            f"exp_manager.explicit_log_dir={run}", f"trainer.max_steps={steps}", f"trainer.{loop}.max_steps={steps}",
            f"trainer.{loop}.val_check_interval={val_every}", f"trainer.{loop}.save_interval={steps}",
            f"trainer.{loop}.limit_val_batches={HELDOUT // _micro_batch(extra, config)}", *EMBEDDED, *extra]
    assert main(args) == 0
    val = json.load(open(run / "metrics.json"))["validation"][-1]
    assert len(val["prompts"]) == HELDOUT and all("background" in p for p in val["prompts"])
    diff = torch.tensor(val["rewards_tuned"]) - torch.tensor(val["rewards_base"])
    se = diff.std() / diff.numel() ** 0.5
    assert diff.mean() > 3 * se and diff.mean() > 0, (name, diff.mean().item(), se.item())
