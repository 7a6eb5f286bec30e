"""Every bad input of the README's reliability table, through the real entry point (``main``): exit code 2,
one message per problem naming the key (or path) and what was expected, no traceback, and — for
everything caught before training — no run directory."""
import os
import shutil

import pytest
import torch

from reliability_helpers import last_checkpoint, load_ckpt, run_cli, tiny_args


# --------------------------------------------------------------------------- rewards used by the table
def wrong_shape_reward():
    return lambda images, prompts: images.mean(dim=(2, 3))  # [B, 3], not [B]


def wrong_dtype_reward():
    return lambda images, prompts: (images.mean(dim=(1, 2, 3)) * 100).long()


def not_a_tensor_reward():
    return lambda images, prompts: [0.0] * images.shape[0]


def _main(args, capsys):
    from nemo_aligner_draft.cli.train import main

    rc = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def _files(tmp_path):
    d = tmp_path / "inputs"
    d.mkdir()
    (d / "empty.txt").write_text("")
    (d / "blank.txt").write_text("a cat\n\n a dog\n   \na fox\n")
    (d / "long.txt").write_text("a cat\n" + "x" * 50 + "\na dog\n" + "y" * 60 + "\n")
    (d / "binary.txt").write_bytes(b"a cat\n\xff\xfe\xfa broken\n")
    (d / "bad.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": 3}\n')
    (d / "one.txt").write_text("a single prompt\n")
    (d / "two.txt").write_text("a first prompt\na second prompt\n")
    (d / "somedir").mkdir()
    (d / "not_sd").mkdir()
    (d / "corrupt_sd").mkdir()
    (d / "corrupt_sd" / "model_index.json").write_text("{ this is not json")
    (d / "rm.bin").write_bytes(b"not a checkpoint")
    return d


# (case, overrides, expected message fragments); "{d}" is the inputs directory
CASES = [
    # ---- configuration
    ("unknown key", ["+model.foo=1"], ["model.foo: unknown key"]),
    ("wrong type", ["model.micro_batch_size=two"], ["model.micro_batch_size: got 'two' (str), expected int"]),
    ("truncation_steps > steps", ["model.truncation_steps=5"],
     ["model.truncation_steps: got 5, expected an integer in [1, model.infer.inference_steps=4]"]),
    ("LoRA rank 0", ["model.peft.lora_tuning.adapter_dim=0"],
     ["model.peft.lora_tuning.adapter_dim: got 0, expected an integer > 0 (the LoRA rank)"]),
    ("LoRA rank < 0", ["model.peft.lora_tuning.adapter_dim=-4"], ["model.peft.lora_tuning.adapter_dim: got -4"]),
    ("resolution not /8", ["model.infer.width=100"],
     ["model.infer.width: got 100, expected a positive multiple of 8"]),
    ("CFG < 0", ["model.infer.unconditional_guidance_scale=-1"],
     ["model.infer.unconditional_guidance_scale: got -1.0, expected a number >= 0"]),
    ("batch sizes do not divide", ["model.micro_batch_size=3", "model.global_batch_size=4"],
     ["model.global_batch_size: got 4, expected a multiple of model.micro_batch_size × data-parallel size"]),
    ("mandatory value missing", ["model.pretrained=???"], ["model.pretrained: mandatory value missing"]),
    ("override of a key that does not exist", ["model.nonexistent_key=3"], ["nonexistent_key"]),
    # ---- model path
    ("missing model", ["model.pretrained=/nonexistent/sd"], ["model.pretrained: '/nonexistent/sd' is not a directory"]),
    ("model dir without model_index.json", ["model.pretrained={d}/not_sd"], ["model.pretrained:", "model_index.json"]),
    ("corrupt model_index.json", ["model.pretrained={d}/corrupt_sd"],
     ["model.pretrained: cannot load a diffusers pipeline from", "JSONDecodeError"]),
    # ---- prompts
    ("missing prompt file", ["model.data.train.dataset_path={d}/nope.txt"],
     ["model.data.train.dataset_path: prompt file", "does not exist"]),
    ("prompt path is a directory", ["model.data.train.dataset_path={d}/somedir"],
     ["model.data.train.dataset_path:", "is a directory"]),
    ("empty prompt file", ["model.data.train.dataset_path={d}/empty.txt"], ["is empty"]),
    ("blank lines", ["model.data.train.dataset_path={d}/blank.txt"], ["blank prompt on line(s) 2, 4"]),
    ("over-long lines", ["model.data.train.dataset_path={d}/long.txt", "model.data.max_prompt_chars=40"],
     ["prompt longer than model.data.max_prompt_chars=40 on line(s) 2, 4"]),
    ("not UTF-8", ["model.data.train.dataset_path={d}/binary.txt"], ["cannot read prompt file"]),
    ("bad jsonl line", ["model.data.train.dataset_path={d}/bad.jsonl"], ["bad.jsonl:2: expected an object"]),
    ("validation prompts missing", ["model.data.validation.dataset_path={d}/nope.txt"],
     ["model.data.validation.dataset_path: prompt file"]),
    ("fewer prompts than a micro-batch", ["model.data.train.dataset_path={d}/one.txt"],
     ["model.data.train.dataset_path: 1 prompt(s), fewer than one round"]),
    ("unknown built-in prompt set", ["model.data.train.dataset_path=builtin:nope"], ["unknown built-in prompt set"]),
    # ---- reward
    ("missing reward weights", ["rm.name=clip_score", "rm.model.restore_from_path=/nonexistent/clip"],
     ["rm.model.restore_from_path: '/nonexistent/clip' does not exist"]),
    ("unreadable reward weights", ["rm.name=aesthetic", "rm.model.restore_from_path={d}/rm.bin"],
     ["rm.model.restore_from_path: reward 'aesthetic': cannot load", "rm.bin"]),
    ("unknown reward", ["rm.name=nope"], ["rm.name: unknown reward 'nope'"]),
    ("reward module does not import", ["rm.name=no_such_module_xyz:fn"], ["rm.name: cannot import module"]),
    ("reward returns the wrong shape", ["rm.name=test_bad_inputs:wrong_shape_reward"],
     ["rm.name: reward 'test_bad_inputs:wrong_shape_reward' returned shape (2, 3), expected [2]"]),
    ("reward returns the wrong dtype", ["rm.name=test_bad_inputs:wrong_dtype_reward"],
     ["rm.name: reward 'test_bad_inputs:wrong_dtype_reward' returned dtype torch.int64, expected a floating dtype"]),
    ("reward returns a list", ["rm.name=test_bad_inputs:not_a_tensor_reward"],
     ["returned list, expected a float tensor of shape [2]"]),
    ("non-differentiable reward for DRaFT+", ["rm.name=jpeg_compressibility"], ["is not differentiable"]),
    # ---- errors raised while the model is built name the key that caused them, not model.pretrained
    ("LoRA targets match no module", ["model.peft.lora_tuning.target_modules=[no_such_proj]"],
     ["model.peft.lora_tuning.target_modules:", "no_such_proj"]),
    ("family forced against the pipeline", ["model.family=sdxl"],
     ["model.family: got 'sdxl', but", "holds a 'sd'-family pipeline"]),
    ("PPO epoch larger than the prompt set", ["model.data.train.dataset_path={d}/two.txt", "model.algorithm=ddpo",
                                              "+model.ddpo.num_sample_batches=2", "model.infer.eta=1.0",
                                              "rm.name=jpeg_compressibility", "+trainer.ddpo.max_steps=1"],
     ["model.ddpo.num_sample_batches: one PPO epoch draws", "has only 2"]),
    # ---- the run directory
    ("run directory under a file", ["exp_manager.explicit_log_dir={d}/one.txt/run"],
     ["exp_manager.explicit_log_dir: cannot create the run directory", "one.txt' is not a directory"]),
    ("run directory is a file", ["exp_manager.explicit_log_dir={d}/one.txt"],
     ["exp_manager.explicit_log_dir:", "exists and is not a directory"]),
    ("EMA with sharded FSDP", ["trainer.strategy=fsdp", "exp_manager.ema.enable=true"],
     ["exp_manager.ema.enable: not supported with trainer.strategy=fsdp"]),
    ("NeMo's fsdp switch against DDP", ["+model.fsdp=true", "trainer.strategy=ddp"],
     ["model.fsdp: true asks for FSDP, but trainer.strategy is 'ddp'"]),
    # ---- Lightning refuses the trainer settings
    ("GPU asked for on a CPU machine", ["trainer.accelerator=gpu"], ["trainer.accelerator:"]),
    # ---- command line
    ("malformed override", ["model.kl_coeff=[1"], ["model.kl_coeff=[1:"]),
    ("interpolation that does not resolve", ["model.kl_coeff=${nope}"], ["model.kl_coeff", "nope"]),
]


@pytest.mark.parametrize("case,overrides,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_message_exit_2_no_run_dir(case, overrides, expect, tiny_sd_dir, tmp_path, capsys):
    d = _files(tmp_path)
    run = tmp_path / "run"
    args = tiny_args(tiny_sd_dir, run, 1, [o.replace("{d}", str(d)) for o in overrides])
    rc, err = _main(args, capsys)
    assert rc == 2, (case, err[-2000:])
    for fragment in expect:
        assert fragment in err, (case, err[-2000:])
    assert "\nerror: " in "\n" + err, err[-2000:]
    assert not run.exists(), f"{case}: a run directory was created"


def test_every_config_problem_is_listed_in_one_attempt(tiny_sd_dir, tmp_path, capsys):
    run = tmp_path / "run"
    rc, err = _main(tiny_args(tiny_sd_dir, run, 1, [
        "+model.foo=1", "+trainer.bar=2", "model.kl_coeff=lots", "model.truncation_steps=11",
        "model.peft.lora_tuning.adapter_dim=0", "model.infer.height=100", "model.infer.unconditional_guidance_scale=-2",
        "model.micro_batch_size=3", "model.global_batch_size=4"]), capsys)
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("  - ")]
    keys = sorted(line[4:].split(":", 1)[0] for line in lines)
    assert keys == sorted(["model.foo", "trainer.bar", "model.kl_coeff", "model.truncation_steps",
                           "model.peft.lora_tuning.adapter_dim", "model.infer.height",
                           "model.infer.unconditional_guidance_scale", "model.global_batch_size"]), err
    assert not run.exists()


def test_subprocess_prints_no_traceback(tiny_sd_dir, tmp_path):
    """The real process: exit 2, the messages on stderr, no Python traceback, no run directory."""
    run = tmp_path / "run"
    proc = run_cli(tiny_args(tiny_sd_dir, run, 1, ["model.infer.width=100", "rm.name=test_bad_inputs:wrong_shape_reward"]),
                   tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "model.infer.width: got 100" in proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert not run.exists()


# --------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def one_step_run(tiny_sd_dir, tmp_path_factory):
    from nemo_aligner_draft.cli.train import main

    run = tmp_path_factory.mktemp("ckpt") / "run"
    assert main(tiny_args(tiny_sd_dir, run, 1)) == 0
    return run


def _resume(one_step_run, tiny_sd_dir, tmp_path, capsys, extra=(), tamper=None):
    run = tmp_path / "run"
    shutil.copytree(one_step_run, run)
    os.remove(run / "checkpoints" / "draftp_tiny.nemo")  # a finished run's .nemo is not what resume reads
    if tamper:
        tamper(last_checkpoint(str(run)))
    return _main(tiny_args(tiny_sd_dir, run, 2, list(extra)), capsys)


def test_checkpoint_with_other_lora_rank_is_refused(one_step_run, tiny_sd_dir, tmp_path, capsys):
    rc, err = _resume(one_step_run, tiny_sd_dir, tmp_path, capsys, ["model.peft.lora_tuning.adapter_dim=8"])
    assert rc == 2
    assert "checkpoint was trained with peft_scheme/adapter_dim=('sdlora', 4)" in err
    assert "model.peft.lora_tuning.adapter_dim=('sdlora', 8)" in err


def test_checkpoint_of_a_different_model_is_refused(one_step_run, tiny_sd_dir, tmp_path, capsys):
    from nemo_aligner_draft.models.checkpoint_io import atomic_torch_save

    def other_architecture(path):
        ckpt = load_ckpt(path)
        k = sorted(ckpt["state_dict"])[0]
        ckpt["state_dict"][k] = torch.zeros(3, 3)  # a tensor this model's layer cannot hold
        del ckpt["state_dict"][sorted(ckpt["state_dict"])[1]]
        atomic_torch_save(ckpt, path)

    rc, err = _resume(one_step_run, tiny_sd_dir, tmp_path, capsys, tamper=other_architecture)
    assert rc == 2
    assert "checkpoint does not match this model: 1 missing trainable tensors" in err
    assert "1 with mismatched shapes" in err


def test_truncated_checkpoint_is_a_clear_error(one_step_run, tiny_sd_dir, tmp_path, capsys):
    def truncate(path):
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])

    rc, err = _resume(one_step_run, tiny_sd_dir, tmp_path, capsys, tamper=truncate)
    assert rc == 2
    assert "checkpoint" in err and "cannot be loaded safely (weights_only=True)" in err


def test_checkpoint_that_would_run_code_is_refused(one_step_run, tiny_sd_dir, tmp_path, capsys):
    """A pickle that calls a function on load (here os.getcwd via __reduce__) is refused unexecuted."""
    class RunsCode:
        def __reduce__(self):
            return (os.getcwd, ())

    def plant(path):
        ckpt = load_ckpt(path)
        ckpt["alignment_state"]["payload"] = RunsCode()
        torch.save(ckpt, path)

    rc, err = _resume(one_step_run, tiny_sd_dir, tmp_path, capsys, tamper=plant)
    assert rc == 2
    assert "cannot be loaded safely (weights_only=True)" in err and "getcwd" in err


# --------------------------------------------------------------------------- config files
def test_yaml_syntax_error_names_file_and_line(tiny_sd_dir, tmp_path):
    """A config file that is not valid YAML: exit 2, ``file:line`` of the problem, no traceback."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "broken.yaml").write_text("name: broken\nmodel:\n  kl_coeff: [1\n  micro_batch_size: 2\n")
    run = tmp_path / "run"
    proc = run_cli([f"--config-path={conf}", "--config-name=broken", f"exp_manager.explicit_log_dir={run}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{conf / 'broken.yaml'}:4: YAML syntax error" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert len([ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]) == 1
    assert not run.exists()


@pytest.mark.parametrize("flag,value,expect", [
    ("--config-path", "/nonexistent/conf", "--config-path: '/nonexistent/conf' is not a directory"),
    ("--config-name", "no_such_config", "--config-name: no no_such_config.yaml in"),
])
def test_config_flags_are_named(flag, value, expect, tiny_sd_dir, tmp_path, capsys):
    rc, err = _main([f"{flag}={value}", f"model.pretrained={tiny_sd_dir}"], capsys)
    assert rc == 2 and expect in err, err[-2000:]
