"""DRaFT+ (LoRA) from the shipped embedded weights raises the held-out embedded_clip_score beyond a
zero-learning-rate control with the same seeds, and validation logs diversity before/after."""
import json
import math

import pytest
import torch


def test_draftp_on_embedded_model_beats_zero_lr_control(tmp_path):
    from nemo_aligner_draft.cli.train import main
    from nemo_aligner_draft.embedded import models

    sd = models.pipeline_path()
    common = ["--config-name=draftp_embedded", f"model.pretrained={sd}", "trainer.max_steps=30",
              "trainer.draftp_sd.max_steps=30", "trainer.draftp_sd.val_check_interval=30",
              "trainer.draftp_sd.save_interval=30", "trainer.draftp_sd.limit_val_batches=6"]
    results = {}
    for lr in (0.003, 0.0):
        run = tmp_path / f"lr{lr}"
        assert main([*common, f"model.optim.lr={lr}", f"exp_manager.explicit_log_dir={run}"]) == 0
        results[lr] = json.load(open(run / "metrics.json"))["validation"][-1]
    trained = torch.tensor(results[0.003]["rewards_tuned"])
    control = torch.tensor(results[0.0]["rewards_tuned"])
    diff = trained - control
    se = diff.std() / diff.numel() ** 0.5
    # held-out prompts: attribute combinations never seen in pretraining or fine-tuning
    assert all("background" in p for p in results[0.003]["prompts"])
    assert diff.mean() > 3 * se and diff.mean() > 0, (diff.mean().item(), se.item())
    for key in ("diversity_base", "diversity_tuned"):
        assert math.isfinite(results[0.003][key]) and 0 < results[0.003][key] <= 2
