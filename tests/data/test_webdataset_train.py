"""The real entry point trains from webdataset shards: ``model.data.train.dataset_path=<prompts.tar>``
(the path NeMo-Aligner's ``model.data.webdataset.local_root_path`` is routed to). One epoch is known
before training (``max_epochs`` caps the steps), bad shards stop the run before anything exists, and a
run killed with SIGKILL resumes bit-identical from a tar source across epoch boundaries."""
import os

from reliability_helpers import (assert_same_training_state, last_checkpoint, load_ckpt, run_cli, sigkill_after_checkpoint,
                                 start_cli, tiny_args)
from wds_helpers import write_samples, write_shard

SEEN = []  # prompts the recording reward was asked to score (in-process runs)


def recording_reward():
    """Differentiable (mean brightness) and records the prompts of every call."""
    def reward(images, prompts):
        SEEN.append(list(prompts))
        return images.mean(dim=(1, 2, 3))

    return reward


def _main(args, capsys):
    from nemo_aligner_draft.cli.train import main

    rc = main(args)
    return rc, capsys.readouterr().err


def test_trains_one_epoch_of_a_tar(tiny_sd_dir, tmp_path, capsys):
    """4 prompts, global batch 2, max_epochs=1 with max_steps=5: two steps, each prompt once."""
    tar = write_shard(tmp_path / "prompts.tar", ["a red cube", "a blue sphere", "a green cone", "a white torus"])
    run = tmp_path / "run"
    SEEN.clear()
    rc, err = _main(tiny_args(tiny_sd_dir, run, 5, [f"model.data.train.dataset_path={tar}",
                                                    "trainer.draftp_sd.max_epochs=1",
                                                    "rm.name=test_webdataset_train:recording_reward"]), capsys)
    assert rc == 0, err[-3000:]
    ckpt = load_ckpt(last_checkpoint(str(run)))
    assert ckpt["global_step"] == 2
    assert ckpt["alignment_state"]["consumed_samples"] == 4
    trained = [p for call in SEEN for p in call if p != "a photo"]  # "a photo": the reward probe of preflight
    assert sorted(trained) == sorted(["a red cube", "a blue sphere", "a green cone", "a white torus"]), SEEN
    assert os.path.exists(run / "checkpoints" / "draftp_tiny.nemo")


def test_a_bad_shard_stops_before_anything_is_created(tiny_sd_dir, tmp_path, capsys):
    tar = write_samples(tmp_path / "images.tar", [{"__key__": "sample000000", "jpg": b"\xff\xd8"}])
    run = tmp_path / "run"
    rc, err = _main(tiny_args(tiny_sd_dir, run, 1, [f"model.data.train.dataset_path={tar}"]), capsys)
    assert rc == 2
    assert "model.data.train.dataset_path: webdataset shard" in err and "has no prompts (no .txt members)" in err
    assert "Traceback" not in err
    assert not run.exists()


def test_fewer_prompts_in_the_tar_than_one_round(tiny_sd_dir, tmp_path, capsys):
    tar = write_shard(tmp_path / "one.tar", ["a single prompt"])
    rc, err = _main(tiny_args(tiny_sd_dir, tmp_path / "run", 1, [f"model.data.train.dataset_path={tar}"]), capsys)
    assert rc == 2
    assert "model.data.train.dataset_path: 1 prompt(s), fewer than one round" in err


STEPS, KILL_AFTER = 6, 2


def test_sigkill_then_resume_from_a_tar_is_bit_identical(tiny_sd_dir, tmp_path):
    """10 prompts in rounds of 2 (5 rounds an epoch), global batch 4: 6 steps draw 24 prompts, 2.4 epochs,
    and the resume lands inside the second epoch."""
    tar = write_shard(tmp_path / "prompts.tar", [f"a photo of a {c} {s}" for c in ("red", "blue")
                                                 for s in ("cube", "ball", "cone", "ring", "star")])
    extra = ["model.global_batch_size=4", f"model.data.train.dataset_path={tar}"]
    ref_dir, victim_dir = str(tmp_path / "reference"), str(tmp_path / "victim")
    ref = start_cli(tiny_args(tiny_sd_dir, ref_dir, STEPS, extra), tmp_path, tmp_path / "reference.log")
    victim_args = tiny_args(tiny_sd_dir, victim_dir, STEPS, extra)
    killed_at = sigkill_after_checkpoint(victim_args, victim_dir, tmp_path, KILL_AFTER)
    assert KILL_AFTER <= killed_at < STEPS

    resumed = run_cli(victim_args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming training from checkpoint" in resumed.stdout + resumed.stderr
    assert ref.wait(timeout=300) == 0, open(tmp_path / "reference.log").read()[-3000:]
    a, b = load_ckpt(last_checkpoint(ref_dir)), load_ckpt(last_checkpoint(victim_dir))
    assert a["global_step"] == STEPS
    assert a["alignment_state"]["consumed_samples"] == STEPS * 4
    assert_same_training_state(a, b)
