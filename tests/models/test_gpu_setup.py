"""What a GPU run sets up, checked without one: apex FusedAdam for ``model.optim.name=fused_adam`` (a
notice and torch's AdamW when apex is absent) and TF32 on Ampere or newer."""
import logging
import sys
import types

import torch

from nemo_aligner_draft.models.distributed import enable_tf32

BUILT = []


class RecordingFusedAdam(torch.optim.AdamW):
    """Stands in for apex.optimizers.FusedAdam (same constructor keywords NeMo passes)."""

    def __init__(self, params, lr, betas, weight_decay, adam_w_mode):
        BUILT.append({"lr": lr, "betas": betas, "weight_decay": weight_decay, "adam_w_mode": adam_w_mode})
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay)


def _one_step(tiny_sd_dir, run):
    from nemo_aligner_draft.cli.train import main

    return main(["--config-name=draftp_tiny", f"model.pretrained={tiny_sd_dir}", f"exp_manager.explicit_log_dir={run}",
                 "trainer.max_steps=1", "trainer.draftp_sd.max_steps=1", "trainer.draftp_sd.val_check_interval=0",
                 "trainer.draftp_sd.save_interval=1", "model.infer.inference_steps=2", "model.micro_batch_size=2",
                 "model.global_batch_size=2", "model.optim.name=fused_adam", "model.optim.weight_decay=0.01",
                 "exp_manager.create_tensorboard_logger=false"])


def test_fused_adam_without_apex_is_adamw_with_a_notice(tiny_sd_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "apex", None)  # not importable, whatever is installed
    monkeypatch.setitem(sys.modules, "apex.optimizers", None)
    with caplog.at_level(logging.WARNING, logger="nemo_aligner_draft"):
        assert _one_step(tiny_sd_dir, tmp_path / "run") == 0
    notices = [r.getMessage() for r in caplog.records if "fused_adam needs apex" in r.getMessage()]
    assert notices and notices[0].startswith("notice: model.optim.name:")


def test_fused_adam_is_apex_when_importable(tiny_sd_dir, tmp_path, monkeypatch, caplog):
    apex, optimizers = types.ModuleType("apex"), types.ModuleType("apex.optimizers")
    optimizers.FusedAdam = RecordingFusedAdam
    apex.optimizers = optimizers
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.optimizers", optimizers)
    BUILT.clear()
    with caplog.at_level(logging.WARNING, logger="nemo_aligner_draft"):
        assert _one_step(tiny_sd_dir, tmp_path / "run") == 0
    assert len(BUILT) == 1 and BUILT[0]["adam_w_mode"] is True and BUILT[0]["weight_decay"] == 0.01
    assert "fused_adam needs apex" not in caplog.text


def test_tf32_is_switched_on_for_ampere_and_newer_only(monkeypatch):
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))  # V100
        assert enable_tf32() is False
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))  # A100
        assert enable_tf32() is True
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        torch.backends.cuda.matmul.allow_tf32 = False
        assert enable_tf32() is False and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
