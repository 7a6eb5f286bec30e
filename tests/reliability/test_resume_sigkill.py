"""Exact resume: a training process killed with SIGKILL mid-run and restarted with the same command
ends bit-identical to an uninterrupted run (weights, Adam moments, LR scheduler, step, consumed samples,
and the EMA weights of exp_manager.ema).

Both runs go through the real entry point in subprocesses; the victim is killed as soon as its
checkpoint for step >= 3 of 10 exists, while it keeps training."""
import os
import re

import torch

from reliability_helpers import (assert_same_training_state, last_checkpoint, load_ckpt, run_cli, sigkill_after_checkpoint,
                                 start_cli, tiny_args)

STEPS = 8
KILL_AFTER = 3




def test_sigkill_mid_training_then_resume_is_bit_identical(tiny_sd_dir, tmp_path):
    # global batch 4 = 2 micro-batches of 2: the resume also has to land on an accumulation boundary
    extra = ["model.global_batch_size=4", "exp_manager.ema.enable=true", "exp_manager.ema.decay=0.5"]
    ref_dir, victim_dir = str(tmp_path / "reference"), str(tmp_path / "victim")
    ref = start_cli(tiny_args(tiny_sd_dir, ref_dir, STEPS, extra), tmp_path, tmp_path / "reference.log")
    victim_args = tiny_args(tiny_sd_dir, victim_dir, STEPS, extra)
    killed_at = sigkill_after_checkpoint(victim_args, victim_dir, tmp_path, KILL_AFTER)
    assert killed_at < STEPS, "killed mid-training, not after the end"
    assert not os.path.exists(os.path.join(victim_dir, "checkpoints", "draftp_tiny.nemo"))

    resumed = run_cli(victim_args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = resumed.stdout + resumed.stderr
    assert re.search(r"Resuming training from checkpoint: \S*step=(\d+)-last\.ckpt", out), out[-3000:]
    resumed_from = int(re.search(r"Resuming training from checkpoint: \S*step=(\d+)-last", out).group(1))
    assert resumed_from == killed_at >= KILL_AFTER, "resume takes the newest complete checkpoint"
    assert ref.wait(timeout=300) == 0, open(tmp_path / "reference.log").read()[-3000:]

    a, b = load_ckpt(last_checkpoint(ref_dir)), load_ckpt(last_checkpoint(victim_dir))
    assert a["global_step"] == STEPS
    assert a["alignment_state"]["consumed_samples"] == STEPS * 4
    assert_same_training_state(a, b)
    ema_a, ema_b = (load_ckpt(last_checkpoint(d).replace("last.ckpt", "last-EMA.ckpt")) for d in (ref_dir, victim_dir))
    assert all(torch.equal(ema_a["state_dict"][k], ema_b["state_dict"][k]) for k in ema_a["state_dict"])
    assert all(torch.equal(x, y) for x, y in zip(ema_a["optimizer_states"][0]["ema"], ema_b["optimizer_states"][0]["ema"]))
    assert any(not torch.equal(ema_a["state_dict"][k], a["state_dict"][k]) for k in a["state_dict"]), "EMA ≠ weights"
    assert any(float(v.abs().max()) > 0 for k, v in a["state_dict"].items() if "lora_B" in k), "weights trained"
