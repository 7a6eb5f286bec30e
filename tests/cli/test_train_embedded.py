"""DRaFT+ (LoRA) from the shipped embedded weights, through the real CLI.

* The demo config (``conf/draftp_embedded.yaml``, reward ``embedded_clip_score``) runs, an lr=0 control
  renders exactly the base images, and validation logs the paired statistics and the diversity before
  and after. No gain is asserted on this reward: one run's clip-score gain is not reliably beyond its
  noise (measured, 30 steps, seeds 1234 / 1 / 2: +3.4 / +0.3 / +1.3 at 3.3 / 0.2 / 1.0 SE;
  docs/experiments.md#demo).
* The same DRaFT+ setting (K=5, kl_coeff 0.2, rank-16 LoRA, 32 samples per step) on ``brightness``, a
  reward with headroom on every image of this model, raises the held-out reward beyond the lr=0 control
  by more than 3 SE of the paired per-image differences.
"""
import json
import math

import torch

COMMON = ["--config-name=draftp_embedded", "exp_manager.create_tensorboard_logger=false"]


def _run(tmp_path, name, steps, extra=()):
    from nemo_aligner_draft.cli.train import main
    from nemo_aligner_draft.embedded import models

    run = tmp_path / name
    args = [*COMMON, f"model.pretrained={models.pipeline_path()}", f"exp_manager.explicit_log_dir={run}",
            f"trainer.max_steps={steps}", f"trainer.draftp_sd.max_steps={steps}",
            f"trainer.draftp_sd.val_check_interval={steps}", f"trainer.draftp_sd.save_interval={steps}", *extra]
    assert main(args) == 0
    return json.load(open(run / "metrics.json"))["validation"][-1]


def test_demo_config_runs_with_paired_statistics_and_diversity(tmp_path):
    trained = _run(tmp_path, "trained", 3)
    control = _run(tmp_path, "control", 1, ["model.optim.lr=0.0"])
    assert trained["prompts"] == control["prompts"] and len(trained["prompts"]) == 96
    # held-out prompts: attribute combinations never seen in pretraining or fine-tuning
    assert all("background" in p for p in trained["prompts"])
    # whatever its length, an lr=0 run renders the base images: the trained run's own base renders
    torch.testing.assert_close(torch.tensor(control["rewards_tuned"]), torch.tensor(trained["rewards_base"]))
    assert control["rewards_tuned"] == control["rewards_base"]
    diff = torch.tensor(trained["rewards_tuned"], dtype=torch.float64) - torch.tensor(trained["rewards_base"],
                                                                                     dtype=torch.float64)
    assert diff.abs().max() > 0, "three LoRA steps at lr 2e-3 change the renders"
    # the paired statistics the validation logs (demo summary, draft_vs_draftp) are these numbers
    assert math.isclose(trained["gain_standard_error"], (diff.std() / diff.numel() ** 0.5).item(), rel_tol=1e-4)
    assert trained["images_improved"] == int((diff > 0).sum())
    for key in ("diversity_base", "diversity_tuned"):
        assert math.isfinite(trained[key]) and 0 < trained[key] <= 2


def test_draftp_on_embedded_model_beats_zero_lr_control(tmp_path):
    """20 steps of the demo's DRaFT+ setting on ``brightness``. The control is the validation's
    ``rewards_base`` (adapters off, same latents), which is what an lr=0 run renders (checked above).

    Margins measured (z = mean paired gain / SE, pass z > 3), seeds 1234 / 1 / 2: z 19.1 / 19.3 / 19.2
    (gain +0.52 / +0.49 / +0.52 of 1), with the demo's current adapter (NeMo's sdlora modules, A
    initialised kaiming). NeMo-Aligner's xavier init: z 18.5 / 18.6 / 19.0. The earlier attention-only
    adapter: z 19.0 / 18.9 / 19.1, and seeds 2 / 1 with AVX2 kernels forced (a stand-in for another
    CPU) z 19.2 / 18.9."""
    val = _run(tmp_path, "run", 20, ["rm.name=brightness"])
    assert len(val["prompts"]) == 96
    diff = torch.tensor(val["rewards_tuned"]) - torch.tensor(val["rewards_base"])
    se = diff.std() / diff.numel() ** 0.5
    assert diff.mean() > 3 * se and diff.mean() > 0, (diff.mean().item(), se.item())
