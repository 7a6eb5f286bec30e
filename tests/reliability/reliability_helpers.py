"""Shared pieces of the reliability tests: the tiny-run overrides and how to run the real CLI."""
import glob
import os
import re
import signal
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "examples", "mm", "stable_diffusion", "train_sd_draftp.py")
HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_args(sd_dir, run_dir, steps=2, extra=()):
    """A short DRaFT+ run on the tiny model: no validation, a checkpoint every step, no TensorBoard."""
    return ["--config-name=draftp_tiny", f"model.pretrained={sd_dir}", f"exp_manager.explicit_log_dir={run_dir}",
            f"trainer.max_steps={steps}", f"trainer.draftp_sd.max_steps={steps}",
            "trainer.draftp_sd.val_check_interval=0", "trainer.draftp_sd.save_interval=1",
            "model.infer.inference_steps=4", "model.micro_batch_size=2", "model.global_batch_size=2",
            "exp_manager.create_tensorboard_logger=false", *extra]


def cli_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([HERE, REPO, env.get("PYTHONPATH", "")])
    return env


def start_cli(args, cwd, log_path):
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, TRAIN, *args], stdout=log, stderr=subprocess.STDOUT, env=cli_env(),
                            cwd=cwd)


def run_cli(args, cwd, timeout=300):
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, env=cli_env(), cwd=cwd,
                          timeout=timeout)


def load_ckpt(path):
    from nemo_aligner_draft.models.checkpoint_io import safe_load_checkpoint

    return safe_load_checkpoint(path)


def last_checkpoint(run_dir):
    d = os.path.join(run_dir, "checkpoints")
    lasts = [f for f in os.listdir(d) if f.endswith("last.ckpt")]
    assert len(lasts) == 1, lasts
    return os.path.join(d, lasts[0])


def assert_same_training_state(a, b):
    """Bit-identical trainable weights, optimizer state, LR scheduler, step and consumed samples."""
    assert a["global_step"] == b["global_step"]
    assert a["alignment_state"] == b["alignment_state"]
    sa, sb = a["state_dict"], b["state_dict"]
    assert sa.keys() == sb.keys() and sa
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"weight {k} differs: max |Δ| {(sa[k] - sb[k]).abs().max().item()}"
    oa, ob = a["optimizer_states"], b["optimizer_states"]
    assert len(oa) == len(ob)
    for x, y in zip(oa, ob):
        assert x["param_groups"] == y["param_groups"]
        assert x["state"].keys() == y["state"].keys() and x["state"]
        for i in x["state"]:
            for name, v in x["state"][i].items():
                assert torch.equal(v, y["state"][i][name]), f"optimizer state {i}.{name} differs"
    assert a["lr_schedulers"] == b["lr_schedulers"]


def checkpointed_step(run_dir):
    """Newest *complete* last checkpoint: NeMo marks one being written (model, then its -EMA twin)
    with ``<name>-unfinished`` until both are on disk."""
    steps = [int(m.group(1)) for p in glob.glob(os.path.join(run_dir, "checkpoints", "*last.ckpt"))
             if (m := re.search(r"step=(\d+)", os.path.basename(p)))
             and not os.path.exists(p.removesuffix(".ckpt") + "-unfinished")]
    return max(steps, default=-1)


def sigkill_after_checkpoint(args, run_dir, cwd, kill_after, timeout=240):
    """Start a training run, SIGKILL it as soon as a complete checkpoint of step ``kill_after`` or
    later is on disk, and return the step of the newest complete checkpoint it left."""
    log_path = os.path.join(str(cwd), os.path.basename(str(run_dir)) + ".log")
    victim = start_cli(args, cwd, log_path)
    deadline = time.monotonic() + timeout
    while checkpointed_step(run_dir) < kill_after:
        assert victim.poll() is None, "the run ended before it could be killed:\n" + open(log_path).read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    return checkpointed_step(run_dir)
