"""Shared pieces of the multi-process tests: the tiny training command line and the rank dumps."""
import glob
import os
import shutil
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "examples", "mm", "stable_diffusion", "train_sd_draftp.py")
VENV_BIN = os.path.dirname(sys.executable)
STEPS = 3


def tiny_overrides(sd_dir, run_dir, micro=2, global_batch=4, steps=STEPS, extra=()):
    """Tiny DRaFT+ run with no validation; lr large enough that 3 steps move the LoRA well past fp32 noise."""
    return ["--config-name=draftp_tiny", f"model.pretrained={sd_dir}", f"exp_manager.explicit_log_dir={run_dir}",
            f"trainer.max_steps={steps}", f"trainer.draftp_sd.max_steps={steps}",
            "trainer.draftp_sd.val_check_interval=0", f"trainer.draftp_sd.save_interval={steps}",
            "model.infer.inference_steps=4", f"model.micro_batch_size={micro}",
            f"model.global_batch_size={global_batch}", "model.optim.lr=0.01", "model.optim.sched.warmup_steps=0",
            "trainer.accelerator=cpu", *extra]


def child_env(dump_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", NAD_RANK_DUMP_DIR=dump_dir)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    return env


def load_dumps(dump_dir):
    paths = sorted(glob.glob(os.path.join(dump_dir, "rank*.pt")))
    return [torch.load(p, weights_only=False) for p in paths]


def max_abs_diff(a, b):
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def have(cmd):
    return shutil.which(cmd) is not None
