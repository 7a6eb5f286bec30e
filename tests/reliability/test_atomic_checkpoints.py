"""Atomic checkpoints (models/checkpoint_io.py): a crash while saving leaves the previous checkpoint
loadable, leftovers of a killed save are ignored and tidied, and resume picks the newest complete one."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from reliability_helpers import load_ckpt, last_checkpoint, tiny_args


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_crash_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    from nemo_aligner_draft.models import checkpoint_io

    path = str(tmp_path / "step=1-last.ckpt")
    checkpoint_io.atomic_torch_save({"w": torch.arange(5.0)}, path)
    real_save = torch.save

    def dies_halfway(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.seek(0)
        f.truncate(7)  # a partial file, then the "crash"
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="No space left"):
        checkpoint_io.atomic_torch_save({"w": torch.zeros(5)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(checkpoint_io.safe_load_checkpoint(path)["w"], torch.arange(5.0))
    assert os.listdir(tmp_path) == ["step=1-last.ckpt"], "no temporary left behind by a failed save"


def test_failed_save_during_training_then_resume_from_newest_complete(tiny_sd_dir, tmp_path, monkeypatch):
    from nemo_aligner_draft.cli.train import main
    from nemo_aligner_draft.models.base import AlignmentModel

    run = tmp_path / "run"
    real_save = torch.save
    saves = {"n": 0}

    def fails_from_the_third_save(obj, f, *a, **k):
        saves["n"] += 1
        if saves["n"] >= 3:  # step 1 writes step=1.ckpt and step=1-last.ckpt; step 2's first write dies
            f.write(b"PK\x03\x04partial")
            raise OSError("No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", fails_from_the_third_save)
    with pytest.raises(OSError, match="No space left"):
        main(tiny_args(tiny_sd_dir, run, 3))
    monkeypatch.setattr(torch, "save", real_save)
    ckdir = run / "checkpoints"
    survivor = last_checkpoint(str(run))
    assert os.path.basename(survivor) == "step=1-last.ckpt"
    assert load_ckpt(survivor)["global_step"] == 1  # still loadable
    assert not [f for f in os.listdir(ckdir) if ".tmp-" in f]

    # What a SIGKILL during later saves could leave: a half-written temporary of a dead process, and a
    # second complete *last.ckpt (killed between writing the new last and deleting the old one).
    leftover = ckdir / f"step=2-last.ckpt.tmp-{_dead_pid()}"
    leftover.write_bytes(b"half a checkpoint")
    older = ckdir / "step=0-last.ckpt"
    shutil.copy(survivor, older)
    os.utime(older, (1, 1))

    loaded = []
    original = AlignmentModel.on_load_checkpoint

    def recording(self, checkpoint):
        loaded.append(checkpoint["global_step"])
        return original(self, checkpoint)

    monkeypatch.setattr(AlignmentModel, "on_load_checkpoint", recording)
    assert main(tiny_args(tiny_sd_dir, run, 3)) == 0
    assert loaded == [1], "resumed from the newest complete checkpoint"
    assert not leftover.exists() and (ckdir / "step=0-last.ckpt.stale").exists()
    final = load_ckpt(last_checkpoint(str(run)))
    assert final["global_step"] == 3 and final["alignment_state"]["consumed_samples"] == 6


def test_tidy_leaves_a_live_process_temporary_alone(tmp_path):
    from nemo_aligner_draft.models.checkpoint_io import tidy_checkpoint_dir

    live = tmp_path / f"step=3-last.ckpt.tmp-{os.getpid()}"
    live.write_bytes(b"being written")
    (tmp_path / "step=2-last.ckpt").write_bytes(b"x")
    assert tidy_checkpoint_dir(str(tmp_path)) == []
    assert live.exists()
