"""NeMo-Aligner's three documented DRaFT+ command lines (docs/user-guide/draftp.rst, final commit af2b3bd9 of
github:NVIDIA/NeMo-Aligner) run here with only the paths changed, on tiny checkpoints written in NeMo's
on-disk layouts, on CPU, for 2 steps.

What stands in for the user's files:
* the config: a copy of NeMo-Aligner's own ``conf/draftp_sd.yaml`` / ``draftp_sdxl.yaml``
  (tests/config/nemo_aligner_conf) with only the tiny architecture, CPU, fp32 and 2 steps written in;
* ``UNET_CKPT`` / ``VAE_CKPT``: a NeMo-layout UNet ``.ckpt`` and VAE written by
  ``nemo_aligner_draft.testing.nemo_sd`` as NeMo v2.1.0's loaders read them;
* ``RM_CKPT``: a NeMo-Aligner CLIP reward-model ``.nemo`` (``testing.nemo_rm``);
* ``TRAIN_DATA_PATH``: a prompt tar written with webdataset's TarWriter exactly as the guide's snippet;
* the CLIP text encoder: NeMo's ``openai/clip-vit-large-patch14`` Hub id, found in a local Hugging Face
  cache (``HF_HOME``; nothing is downloaded).
The command lines below are the guide's, variable for variable; ``$GPFS`` is this repository.
"""
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NEMO_CONF = os.path.join(REPO, "tests", "config", "nemo_aligner_conf")
VENV_BIN = os.path.dirname(sys.executable)

TORCHRUN_SD = """torchrun --nproc_per_node=2 ${GPFS}/examples/mm/stable_diffusion/${DRAFTP_SCRIPT} \\
   trainer.num_nodes=1 \\
   trainer.devices=2 \\
   model.micro_batch_size=1 \\
   model.global_batch_size=8 \\
   model.kl_coeff=0.2 \\
   model.optim.lr=0.0001 \\
   model.unet_config.from_pretrained=${UNET_CKPT} \\
   model.first_stage_config.from_pretrained=${VAE_CKPT} \\
   rm.model.restore_from_path=${RM_CKPT} \\
   model.data.train.webdataset.local_root_path=${TRAIN_DATA_PATH} \\
   exp_manager.create_wandb_logger=False \\
   exp_manager.explicit_log_dir=/results"""

SLURM_SD = """python -u ${GPFS}/examples/mm/stable_diffusion/${DRAFTP_SCRIPT} \\
   trainer.num_nodes=1 \\
   trainer.devices=8 \\
   model.micro_batch_size=2 \\
   model.global_batch_size=16 \\
   model.kl_coeff=0.2 \\
   model.optim.lr=0.0001 \\
   model.unet_config.from_pretrained=${UNET_CKPT} \\
   model.first_stage_config.from_pretrained=${VAE_CKPT} \\
   rm.model.restore_from_path=${RM_CKPT} \\
   model.data.webdataset.local_root_path=${TRAIN_DATA_PATH} \\
   exp_manager.explicit_log_dir=${RESULTS_DIR} \\
   exp_manager.create_wandb_logger=True \\
   exp_manager.wandb_logger_kwargs.name=${NAME} \\
   exp_manager.wandb_logger_kwargs.project=${PROJECT}"""

AIG_SDXL = """torchrun --nproc_per_node=$NUM_DEVICES /opt/nemo-aligner/examples/mm/stable_diffusion/${EVAL_SCRIPT} \\
    --config-path=${CONFIG_PATH} \\
    --config-name=${CONFIG_NAME} \\
    model.optim.lr=${LR} \\
    model.optim.weight_decay=0.0005 \\
    model.optim.sched.warmup_steps=0 \\
    model.sampling.base.steps=${INF_STEPS} \\
    model.kl_coeff=${KL_COEF} \\
    model.truncation_steps=1 \\
    trainer.draftp_sd.max_epochs=5 \\
    trainer.draftp_sd.max_steps=10000 \\
    trainer.draftp_sd.save_interval=200 \\
    trainer.draftp_sd.val_check_interval=20 \\
    trainer.draftp_sd.gradient_clip_val=10.0 \\
    model.micro_batch_size=${MICRO_BS} \\
    model.global_batch_size=${GLOBAL_BATCH_SIZE} \\
    model.peft.peft_scheme=${PEFT} \\
    model.data.webdataset.local_root_path=$WEBDATASET_PATH \\
    rm.model.restore_from_path=${RM_CKPT} \\
    trainer.devices=${NUM_DEVICES} \\
    trainer.num_nodes=${NUMNODES} \\
    rm.trainer.devices=${NUM_DEVICES} \\
    rm.trainer.num_nodes=${NUMNODES} \\
    +prompt="${PROMPT}" \\
    exp_manager.create_wandb_logger=${LOG_WANDB} \\
    model.first_stage_config.from_pretrained=${VAE_CKPT} \\
    model.first_stage_config.from_NeMo=True \\
    model.unet_config.from_pretrained=${UNET_CKPT} \\
    model.unet_config.from_NeMo=True \\
    $ACT_CKPT \\
    exp_manager.wandb_logger_kwargs.name=${WANDB_NAME} \\
    exp_manager.resume_if_exists=True \\
    exp_manager.explicit_log_dir=${DIR_SAVE_CKPT_PATH} \\
    exp_manager.wandb_logger_kwargs.project=${PROJECT} +weight_type='draft,base,power_2.0'"""

# 32 prompts: the guide's Slurm line takes 16 per step and NeMo-Aligner's draftp_sd.yaml caps the run at one epoch
PROMPTS = [f"{style} of {thing}" for style in ("a photo", "a watercolor", "a sketch", "an oil painting")
           for thing in ("a red fox", "a lighthouse", "a bowl of ramen", "a robot", "a mountain lake", "a city street",
                         "an astronaut", "a cat")]


def _expand(command: str, variables: dict) -> list:
    """The guide's shell line → argv: its variables substituted, the line continuations joined."""
    text = command.replace("\\\n", " ")
    for name in sorted(variables, key=len, reverse=True):
        text = text.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    return shlex.split(text)


def _hf_cache(root: str, repo_id: str, directory: str) -> None:
    """The layout huggingface_hub's cache uses: models--<org>--<name>/snapshots/<rev>/…, refs/main."""
    base = os.path.join(root, "hub", "models--" + repo_id.replace("/", "--"))
    rev = "0" * 40
    shutil.copytree(directory, os.path.join(base, "snapshots", rev))
    os.makedirs(os.path.join(base, "refs"), exist_ok=True)
    with open(os.path.join(base, "refs", "main"), "w") as f:
        f.write(rev)


def _tiny_conf(dst_dir: str, name: str, model_section: dict, steps: int = 2) -> str:
    """NeMo-Aligner's file with the tiny architecture, CPU, fp32 and ``steps`` written in (nothing else)."""
    raw = yaml.safe_load(open(os.path.join(NEMO_CONF, f"{name}.yaml")))
    for key in ("unet_config", "first_stage_config", "cond_stage_config", "conditioner_config"):
        if key in model_section:
            section = dict(model_section[key])
            if "from_pretrained" in section:
                section["from_pretrained"] = None  # the command line gives the checkpoint paths
            raw["model"][key] = section
    for key in ("scale_factor", "linear_start", "linear_end", "timesteps", "beta_schedule", "parameterization"):
        if key in model_section:
            raw["model"][key] = model_section[key]
    if "infer" in raw["model"]:
        raw["model"]["infer"].update(height=64, width=64, inference_steps=3)
    if "sampling" in raw["model"]:
        raw["model"]["sampling"]["base"].update(height=64, width=64, steps=3, orig_height=64, orig_width=64)
    raw["trainer"].update(accelerator="cpu", precision=32)
    raw["trainer"]["draftp_sd"].update(max_steps=steps, val_check_interval=steps, save_interval=steps)
    raw["exp_manager"]["ema"]["enable"] = False  # NeMo's EMA keeps fp32 copies: not what these tests are about
    os.makedirs(dst_dir, exist_ok=True)
    path = os.path.join(dst_dir, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    return dst_dir


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    import webdataset as wds

    from nemo_aligner_draft.testing import nemo_sd
    from nemo_aligner_draft.testing.nemo_rm import save_tiny_nemo_reward_model

    root = tmp_path_factory.mktemp("nemo_aligner_user")
    sd_section = nemo_sd.write_tiny_nemo_sd(nemo_sd.build_tiny_sd_modules(), str(root / "sd"))
    sdxl_section = nemo_sd.write_tiny_nemo_sdxl(nemo_sd.build_tiny_sdxl_modules(), str(root / "sdxl"))
    hf_home = str(root / "hf_home")
    _hf_cache(hf_home, "openai/clip-vit-large-patch14", sd_section["cond_stage_config"]["version"])
    sd_section = {**sd_section, "cond_stage_config": {**sd_section["cond_stage_config"],
                                                      "version": "openai/clip-vit-large-patch14"}}
    tar = str(root / "prompts.tar")
    sink = wds.TarWriter(tar)  # the guide's conversion snippet
    for index, line in enumerate(PROMPTS):
        sink.write({"__key__": "sample%06d" % index, "txt": line.strip()})
    sink.close()
    return {
        "root": root, "hf_home": hf_home, "tar": tar,
        "rm": save_tiny_nemo_reward_model(str(root / "reward_model.nemo")),
        "sd_conf": _tiny_conf(str(root / "conf_sd"), "draftp_sd", sd_section),
        "sdxl_conf": _tiny_conf(str(root / "conf_sdxl"), "draftp_sdxl", sdxl_section),
        "sd": sd_section, "sdxl": sdxl_section,
    }


def _env(files, **extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=files["hf_home"],
               WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1", **extra)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    return env


def _run(argv, files, cwd, timeout=900):
    proc = subprocess.run(argv, cwd=cwd, env=_env(files), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (argv, proc.stdout[-3000:] + proc.stderr[-4000:])
    return proc


def _sd_variables(files, results):
    return {"GPFS": REPO, "DRAFTP_SCRIPT": "train_sd_draftp.py", "UNET_CKPT": files["sd"]["unet_config"]["from_pretrained"],
            "VAE_CKPT": files["sd"]["first_stage_config"]["from_pretrained"], "RM_CKPT": files["rm"],
            "TRAIN_DATA_PATH": files["tar"], "RESULTS_DIR": results, "NAME": "draftp_tiny_run", "PROJECT": "nemo-draft"}


def _trained(run_dir, steps=2):
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert [h["step"] for h in metrics["train"]] == list(range(1, steps + 1))
    assert all(h["reward_mean"] == h["reward_mean"] for h in metrics["train"])  # finite PickScore-style rewards
    ckpts = os.listdir(os.path.join(run_dir, "checkpoints"))
    assert any(c.endswith("last.ckpt") for c in ckpts), ckpts
    return metrics


def test_the_torchrun_command_line(user_files):
    results = str(user_files["root"] / "results_torchrun")
    argv = [a.replace("=/results", "=" + results) for a in _expand(TORCHRUN_SD, _sd_variables(user_files, results))]
    argv[0] = os.path.join(VENV_BIN, "torchrun")
    # the guide's script takes NeMo-Aligner's conf/ next to it; here the copy of that conf/ is given explicitly
    argv[2:2] = ["--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0"]
    argv.insert(argv.index(next(a for a in argv if a.endswith("train_sd_draftp.py"))) + 1,
                f"--config-path={user_files['sd_conf']}")
    _run(argv, user_files, cwd=str(user_files["root"]))
    metrics = _trained(results)
    assert metrics["train"][-1]["consumed_samples"] == 16.0  # 2 steps of global batch 8 over 2 ranks
    assert os.path.isfile(os.path.join(results, "export", "pytorch_lora_weights.safetensors"))


def test_the_slurm_command_line_with_wandb_offline(user_files):
    results = str(user_files["root"] / "results_slurm")
    argv = _expand(SLURM_SD, _sd_variables(user_files, results))
    argv[0] = sys.executable
    argv.insert(3, f"--config-path={user_files['sd_conf']}")
    # srun gives this one process per GPU; on this CPU it is one process doing the global batch of 16 alone
    argv = [("trainer.devices=1" if a == "trainer.devices=8" else a) for a in argv]
    _run(argv, user_files, cwd=str(user_files["root"]))
    _trained(results)
    runs = [d for root, dirs, _ in os.walk(results) for d in dirs if d.startswith("offline-run-")]
    assert runs, "W&B wrote its offline run (exp_manager.create_wandb_logger=True)"


def test_the_sdxl_aig_command_line(user_files):
    run_dir = str(user_files["root"] / "results_sdxl")
    sdxl = user_files["sdxl"]
    variables = {"NUM_DEVICES": "1", "EVAL_SCRIPT": "anneal_sdxl.py", "CONFIG_PATH": user_files["sdxl_conf"],
                 "CONFIG_NAME": "draftp_sdxl", "LR": "0.00025", "INF_STEPS": "3", "KL_COEF": "0.1", "MICRO_BS": "1",
                 "GLOBAL_BATCH_SIZE": "2", "PEFT": "sdlora", "WEBDATASET_PATH": user_files["tar"],
                 "RM_CKPT": user_files["rm"], "NUMNODES": "1", "PROMPT": "Bananas growing on an apple tree",
                 "LOG_WANDB": "False", "VAE_CKPT": sdxl["first_stage_config"]["from_pretrained"],
                 "UNET_CKPT": sdxl["unet_config"]["from_pretrained"], "ACT_CKPT": "", "WANDB_NAME": "SDXL_Draft_annealing",
                 "DIR_SAVE_CKPT_PATH": run_dir, "PROJECT": "nemo-draft"}
    # first a short DRaFT+ run of the same config (the guide trains before it anneals); 2 steps, not 10000
    train = [("trainer.draftp_sd.max_steps=2" if a == "trainer.draftp_sd.max_steps=10000" else a)
             for a in _expand(AIG_SDXL, dict(variables, EVAL_SCRIPT="train_sdxl_draftp.py"))]
    train = [a for a in train if not a.startswith(("+prompt=", "+weight_type="))]
    train[0:2] = [sys.executable]
    train[1] = os.path.join(REPO, "examples", "mm", "stable_diffusion", "train_sdxl_draftp.py")
    _run(train, user_files, cwd=str(user_files["root"]))
    _trained(run_dir)
    # then the guide's AIG command line itself
    argv = _expand(AIG_SDXL, variables)
    argv[0:2] = [sys.executable]
    argv[1] = os.path.join(REPO, "examples", "mm", "stable_diffusion", "anneal_sdxl.py")
    proc = _run(argv, user_files, cwd=str(user_files["root"]))
    outs = {}
    for wt in ("draft", "base", "power_2.0"):
        d = os.path.join(run_dir, f"annealed_outputs_sdxl_{wt}")
        assert sorted(os.listdir(d)) == ["img_00000_00.png", "prompt_00000_00.txt"], (wt, os.listdir(d))
        assert open(os.path.join(d, "prompt_00000_00.txt")).read() == "Bananas growing on an apple tree"
        outs[wt] = open(os.path.join(d, "img_00000_00.png"), "rb").read()
    assert "fine-tuned weights:" in proc.stdout + proc.stderr
    assert outs["draft"] != outs["base"], "the fine-tuned adapters change the image"


def test_peft_restore_from_path_starts_from_a_nemo_aligner_lora(user_files, tmp_path):
    """``model.peft.restore_from_path`` = a NeMo-Aligner PEFT ``.nemo`` (written as NeMo writes one,
    testing.nemo_lora): the run starts from its adapters (lr 0, so the checkpoint holds exactly them)."""
    import torch

    from nemo_aligner_draft.export.nemo_adapters import nemo_to_peft
    from nemo_aligner_draft.testing import nemo_lora, nemo_sd
    from nemo_aligner_draft.backends.nemo_parts import load_nemo_unet

    u = nemo_sd.TINY_NEMO_UNET
    linears = nemo_lora.nemo_linear_wrappers(u["model_channels"], u["channel_mult"], u["num_res_blocks"],
                                             u["attention_resolutions"], u["transformer_depth"], u["context_dim"])
    state = nemo_lora.nemo_adapter_state(linears, rank=4, seed=3)
    lora = nemo_lora.write_peft_nemo(str(tmp_path / "draftp_lora.nemo"), state, nemo_lora.nemo_model_config(rank=4))
    results = str(tmp_path / "run")
    argv = _expand(SLURM_SD, _sd_variables(user_files, results))
    argv[0] = sys.executable
    argv.insert(3, f"--config-path={user_files['sd_conf']}")
    argv = [("trainer.devices=1" if a == "trainer.devices=8" else a) for a in argv if "wandb" not in a]
    argv += [f"model.peft.restore_from_path={lora}", "model.peft.lora_tuning.adapter_dim=4", "model.optim.lr=0.0",
             "trainer.draftp_sd.max_steps=1"]
    _run(argv, user_files, cwd=str(tmp_path))
    ckpt = torch.load(os.path.join(results, "checkpoints", [f for f in os.listdir(os.path.join(results, "checkpoints"))
                                                            if f.endswith("last.ckpt")][0]),
                      map_location="cpu", weights_only=False)["state_dict"]
    expected, rank, _ = nemo_to_peft(state, load_nemo_unet(dict(u, from_pretrained=user_files["sd"]["unet_config"]["from_pretrained"])))
    got = {k.replace("unet.", "", 1).replace(".default.", "."): v for k, v in ckpt.items() if "lora_" in k}
    assert rank == 4 and set(got) == set(expected) and len(got) == 2 * len(linears)
    assert all(torch.equal(got[k], expected[k].float()) for k in expected)


def _not_a_reward_model(tmp_path):
    """A Stable Diffusion ``.nemo`` (NeMo's tar: model_config.yaml + model_weights.ckpt) given as the reward."""
    import tarfile

    import torch

    d = tmp_path / "sd_nemo"
    d.mkdir()
    (d / "model_config.yaml").write_text("target: nemo.collections.multimodal.models.text_to_image.stable_diffusion."
                                         "ldm.ddpm.MegatronLatentDiffusion\nunet_config: {model_channels: 32}\n")
    torch.save({"model.model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3)}, d / "model_weights.ckpt")
    path = tmp_path / "sd_model.nemo"
    with tarfile.open(path, "w:") as tar:
        tar.add(d, arcname=".")
    return str(path)


def _tar_without_prompts(tmp_path):
    import webdataset as wds

    path = str(tmp_path / "images_only.tar")
    sink = wds.TarWriter(path)
    sink.write({"__key__": "sample000000", "jpg": b"\xff\xd8 not really"})
    sink.close()
    return path


@pytest.mark.parametrize("case", ["rm is a Stable Diffusion .nemo", "shard without prompts",
                                  "UNet checkpoint does not fit unet_config"])
def test_bad_nemo_aligner_inputs_name_their_key_exit_2_and_create_nothing(case, user_files, tmp_path):
    results = str(tmp_path / "run")
    variables = _sd_variables(user_files, results)
    extra = []
    if case.startswith("rm"):
        variables["RM_CKPT"], key = _not_a_reward_model(tmp_path), "rm.model.restore_from_path:"
    elif case.startswith("shard"):
        variables["TRAIN_DATA_PATH"], key = _tar_without_prompts(tmp_path), "model.data.train.dataset_path:"
    else:
        extra, key = ["model.unet_config.model_channels=48"], "model.unet_config.from_pretrained:"
    argv = _expand(SLURM_SD, variables)
    argv[0] = sys.executable
    argv.insert(3, f"--config-path={user_files['sd_conf']}")
    argv = [("trainer.devices=1" if a == "trainer.devices=8" else a) for a in argv if "wandb" not in a] + extra
    proc = subprocess.run(argv, cwd=str(tmp_path), env=_env(user_files), capture_output=True, text=True, timeout=600)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2, (case, proc.stderr[-3000:])
    assert len(errors) == 1 and key in errors[0], (case, errors, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(results), f"{case}: a run directory was created"
