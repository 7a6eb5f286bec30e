"""The worked example of the algorithm registry: a new algorithm is one file (``toy_rwr.py``: its recipe
and its config section) plus one registry line, and then the whole shell serves it — the config
validates its section and loop section, the CLI trains it, the run directory, checkpoint and resume
work — with no other file touched."""
import json
import os

import pytest
import torch

from nemo_aligner_draft.algorithms import ALGORITHMS, Algorithm, register_algorithm

ARGS = ["--config-name=draftp_tiny", "model.algorithm=toy_rwr", "+model.toy_rwr.temperature=0.05",
        "+trainer.toy_rwr.max_steps=3", "+trainer.toy_rwr.max_epochs=-1", "+trainer.toy_rwr.save_interval=3",
        "trainer.max_steps=3", "model.infer.inference_steps=3", "model.micro_batch_size=2", "model.global_batch_size=2",
        "model.optim.lr=0.01", "exp_manager.create_tensorboard_logger=false", "rm.name=brightness"]


@pytest.fixture
def toy_registered():
    # the registry line a new algorithm adds
    register_algorithm(Algorithm("toy_rwr", "toy_rwr:ToyRWRRecipe", loop_section="toy_rwr",
                                 section="toy_rwr:ToyRWRConfig", differentiable_reward=False))
    yield
    del ALGORITHMS["toy_rwr"]


def test_toy_algorithm_trains_through_the_unchanged_shell(toy_registered, tiny_sd_dir, tmp_path):
    from nemo_aligner_draft.cli.train import main
    from nemo_aligner_draft.typed import track_reads

    run = tmp_path / "run"
    with track_reads() as reads:
        assert main([*ARGS, f"model.pretrained={tiny_sd_dir}", f"exp_manager.explicit_log_dir={run}"]) == 0
    assert "model.toy_rwr.temperature" in reads and "trainer.toy_rwr.max_steps" in reads
    train = json.load(open(run / "metrics.json"))["train"]
    assert [h["step"] for h in train] == [1, 2, 3]
    assert all("rwr_weight_max" in h and 0 < h["rwr_weight_max"] <= 1 for h in train)
    ckpt = torch.load(run / "checkpoints" / "step=3-last.ckpt", map_location="cpu", weights_only=False)
    lora_b = [v for k, v in ckpt["state_dict"].items() if "lora_B" in k]
    assert lora_b and any(float(v.abs().max()) > 0 for v in lora_b), "the adapters moved off their zero init"
    assert os.path.isfile(run / "export" / "pytorch_lora_weights.safetensors")


def test_toy_section_is_validated_like_any_other(toy_registered, tiny_sd_dir, tmp_path, capsys):
    from nemo_aligner_draft.cli.train import main

    run = tmp_path / "run"
    args = [a for a in ARGS if not a.startswith("+model.toy_rwr")]
    rc = main([*args, "+model.toy_rwr.temperature=0", f"model.pretrained={tiny_sd_dir}",
               f"exp_manager.explicit_log_dir={run}"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.toy_rwr.temperature: got 0.0, expected a number > 0" in err, err[-1500:]
    assert not run.exists()


def test_unregistered_algorithm_is_refused_by_name(tiny_sd_dir, tmp_path, capsys):
    from nemo_aligner_draft.cli.train import main

    rc = main([*ARGS, f"model.pretrained={tiny_sd_dir}", f"exp_manager.explicit_log_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.algorithm: got 'toy_rwr', expected one of draftp, alignprop, ddpo, sdpo" in err
