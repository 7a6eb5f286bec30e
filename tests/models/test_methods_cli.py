"""AlignProp, DDPO, SDPO and GRPO end to end through the real CLI (Hydra → schema → NeMo shell → run dir).

Per method: a short run of its tiny config (LoRA, as shipped) checks the run directory, the logged
method metrics and that every key in the yaml was read by code; a longer full-fine-tuning run on the
``brightness`` reward checks that the held-out reward beats the zero-learning-rate control. The
control is the validation's ``rewards_base``: the reference model (frozen copy) rendered from the
same fixed latents, which is what an lr=0 run renders — ``test_zero_lr_run_renders_the_base_images``
checks that identity on a real lr=0 DDPO run.
"""
import json
import os

import pytest
import torch
import yaml

from nemo_aligner_draft.testing.config import yaml_leaves

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LOOP = {"alignprop_tiny": "alignprop", "ddpo_tiny": "ddpo", "sdpo_tiny": "sdpo", "grpo_sd_tiny": "grpo"}


def overrides(name, sd_dir, run_dir, steps, val_every, extra=()):
    loop = LOOP[name]
    return [f"--config-name={name}", f"model.pretrained={sd_dir}", f"exp_manager.explicit_log_dir={run_dir}",
            f"trainer.max_steps={steps}", f"trainer.{loop}.max_steps={steps}",
            f"trainer.{loop}.val_check_interval={val_every}", f"trainer.{loop}.save_interval={steps}",
            f"trainer.{loop}.limit_val_batches=1", *extra]


# Short runs: 2 training steps each (AlignProp: 2 optimizer steps; DDPO/SDPO: 2 PPO epochs of
# 2 sample batches = 4 optimizer steps).
SHORT = {
    "alignprop_tiny": dict(steps=2, val_every=2, extra=["model.infer.inference_steps=4"]),
    "ddpo_tiny": dict(steps=4, val_every=2, extra=["model.infer.inference_steps=4", "model.ddpo.eval_steps=[1,2]"]),
    "sdpo_tiny": dict(steps=4, val_every=2, extra=["model.infer.inference_steps=3", "model.sdpo.eval_steps=[1,2,4,8]"]),
    # GRPO rolls out on 3 steps and validates on 4 (Flow-GRPO's train-on-fewer-steps option)
    "grpo_sd_tiny": dict(steps=4, val_every=2, extra=["model.infer.inference_steps=4", "model.grpo.rollout_steps=3",
                                                      "model.grpo.eval_steps=[1,2]"]),
}


@pytest.fixture(scope="module", params=sorted(SHORT))
def short_run(request, tiny_sd_dir, tmp_path_factory):
    from nemo_aligner_draft.cli.train import main
    from nemo_aligner_draft.typed import track_reads

    name = request.param
    run_dir = str(tmp_path_factory.mktemp(name) / "run")
    s = SHORT[name]
    with track_reads() as reads:
        rc = main(overrides(name, tiny_sd_dir, run_dir, s["steps"], s["val_every"], s["extra"]))
    assert rc == 0
    return {"name": name, "dir": run_dir, "reads": set(reads), "sd": tiny_sd_dir}


def test_every_key_in_the_method_config_is_read(short_run):
    raw = yaml.safe_load(open(os.path.join(REPO, "conf", short_run["name"] + ".yaml")))
    unread = sorted(k for k in yaml_leaves(raw) if k not in short_run["reads"])
    assert not unread, f"{short_run['name']}: config keys nothing read: {unread}"


def test_run_directory_and_method_metrics(short_run):
    d, name = short_run["dir"], short_run["name"]
    for rel in ("config.yaml", "metrics.json", "reward_curve.png", "export/pytorch_lora_weights.safetensors",
                f"checkpoints/{name}.nemo"):
        assert os.path.isfile(os.path.join(d, rel)), rel
    metrics = json.load(open(os.path.join(d, "metrics.json")))
    last = metrics["train"][-1]
    assert last["step"] == SHORT[name]["steps"]
    for key in ("train_loss", "reward_mean", "reward_std", "grad_norm", "lr"):
        assert key in last, key
    if name == "alignprop_tiny":
        assert "grad_steps" in last
    else:
        own = {"ddpo_tiny": ("approx_kl",), "sdpo_tiny": ("log_ratio_diff",), "grpo_sd_tiny": ("approx_kl", "kl")}[name]
        for key in ("clipfrac", "samples_seen", *own):
            assert key in last, key
        # 2 PPO epochs × 2 sample batches × 4 prompts (GRPO: 4 images, 2 groups of 2), SDPO a pair per prompt
        per_prompt = 2 if name == "sdpo_tiny" else 1
        assert last["samples_seen"] == 2 * 2 * 4 * per_prompt
    val = metrics["validation"][-1]
    if name != "alignprop_tiny":  # validation at other step counts, fine-tuned and base (SDPO's claim, DDPO beside it)
        counts = (1, 2, 4, 8) if name == "sdpo_tiny" else (1, 2)  # GRPO's and DDPO's from the overrides
        steps_rewards = [val[f"reward_steps{n}"] for n in counts]
        base_rewards = [val[f"reward_steps{n}_base"] for n in counts]
        assert all(0.0 <= r <= 1.0 for r in steps_rewards + base_rewards)  # brightness of images in [0, 1]
        assert len(set(steps_rewards)) == len(counts), "different step counts render different images"
        assert steps_rewards != base_rewards, "the base renders with the adapters off"


def test_policy_gradient_checkpoint_holds_tracker_and_resume_continues(short_run, tmp_path):
    """The stat tracker buffers, samples_seen and the metrics history survive a resume: two more PPO epochs
    continue the count, append to the restored per-prompt buffers and to the run's metrics.json."""
    import shutil

    from nemo_aligner_draft.cli.train import main

    name = short_run["name"]
    d = str(tmp_path / "resumed")
    shutil.copytree(short_run["dir"], d)
    ckpt_dir = os.path.join(d, "checkpoints")
    last = [f for f in os.listdir(ckpt_dir) if f.endswith("-last.ckpt")][0]
    ckpt = torch.load(os.path.join(ckpt_dir, last), map_location="cpu", weights_only=False)
    if name == "alignprop_tiny":  # reward-gradient methods keep no policy-gradient state
        assert "policy_gradient_state" not in ckpt and "alignment_state" in ckpt
        return
    state = ckpt["policy_gradient_state"]
    s = SHORT[name]
    before_val = [v["step"] for v in json.load(open(os.path.join(d, "metrics.json")))["validation"]]
    before_train = [h["step"] for h in json.load(open(os.path.join(d, "metrics.json")))["train"]]

    def history_kept():
        """exp_manager moves the first run's metrics.json into run_0/ on resume: its points are kept."""
        m = json.load(open(os.path.join(d, "metrics.json")))
        val, train = [v["step"] for v in m["validation"]], [h["step"] for h in m["train"]]
        assert before_val and val[:len(before_val)] == before_val and len(val) > len(before_val), (before_val, val)
        assert train[:len(before_train)] == before_train and train == sorted(set(train)), (before_train, train)

    if name == "grpo_sd_tiny":  # GRPO's statistics are each epoch's groups: no tracker to restore
        assert state["tracker"] is None and state["samples_seen"] == 16
        assert main(overrides(name, short_run["sd"], d, s["steps"] + 4, s["val_every"], s["extra"])) == 0
        metrics = json.load(open(os.path.join(d, "metrics.json")))
        assert metrics["train"][-1]["samples_seen"] == 32
        history_kept()
        return
    before = {tuple(k): len(v) for k, v in zip(state["tracker"]["keys"], state["tracker"]["values"])}
    assert state["samples_seen"] == (32 if name == "sdpo_tiny" else 16) and before
    # two more PPO epochs: the second validates again
    assert main(overrides(name, short_run["sd"], d, s["steps"] + 4, s["val_every"], s["extra"])) == 0
    metrics = json.load(open(os.path.join(d, "metrics.json")))
    assert metrics["train"][-1]["samples_seen"] == state["samples_seen"] * 2
    history_kept()
    last = [f for f in os.listdir(ckpt_dir) if f.endswith("-last.ckpt")][0]
    after_state = torch.load(os.path.join(ckpt_dir, last), map_location="cpu",
                             weights_only=False)["policy_gradient_state"]
    after = {tuple(k): len(v) for k, v in zip(after_state["tracker"]["keys"], after_state["tracker"]["values"])}
    grown = sum(after.get(k, 0) - n for k, n in before.items())
    assert all(after.get(k, 0) >= n for k, n in before.items()) and grown > 0, "buffers were restored, then extended"


def test_zero_lr_run_renders_the_base_images(tiny_sd_dir, tmp_path):
    from nemo_aligner_draft.cli.train import main

    run = tmp_path / "lr0"
    assert main(overrides("ddpo_tiny", tiny_sd_dir, str(run), 2, 1,
                          ["model.infer.inference_steps=3", "model.peft.peft_scheme=none", "model.optim.lr=0.0"])) == 0
    val = json.load(open(run / "metrics.json"))["validation"][-1]
    assert val["rewards_tuned"] == val["rewards_base"]
    # the logged paired statistics see no difference either
    assert val["gain_standard_error"] == 0.0 and val["images_improved"] == 0


# Full fine-tuning on brightness (a reward the random tiny model can move), 3 validation batches of
# the 12 animal prompts. Settings measured to finish in seconds on one thread.
#
# Only AlignProp has this outcome test on the tiny random model: it held on seeds 1234 / 1 / 2 with
# z = 60.1 / 62.0 / 52.7 (mean paired gain / SE; AVX2 kernels forced: identical). DDPO and SDPO barely
# move brightness on this random model (gains ~0.001), and their sign depended on the seed in every
# setting tried (DDPO lr 3e-4: z 5.2 / −3.3 / 1.4; lr 3e-3: z −7.6 / 11.8 / 5.8; SDPO lr 1e-3:
# z 5.7 / 8.1 / 1.1; lr 3e-3: z 6.6 / −1.6 / −8.5), so such a test would pass or fail with the machine.
# Their outcome tests run on the embedded pretrained model instead
# (tests/models/test_methods_embedded.py), where they hold on every seed measured.
IMPROVE = {
    "alignprop_tiny": dict(steps=10, val_every=10, extra=["model.optim.lr=0.003"]),
}


@pytest.mark.parametrize("name", sorted(IMPROVE))
def test_method_raises_heldout_reward_beyond_zero_lr_control(name, tiny_sd_dir, tmp_path):
    """Held-out reward (fixed latents) of the trained model beats the lr=0 control by more than 3
    standard errors of the paired per-image differences."""
    from nemo_aligner_draft.cli.train import main

    s = IMPROVE[name]
    run = tmp_path / "run"
    loop = LOOP[name]
    extra = ["model.peft.peft_scheme=none", "model.data.validation.dataset_path=builtin:animals", *s["extra"]]
    args = overrides(name, tiny_sd_dir, str(run), s["steps"], s["val_every"], extra)
    args = [a for a in args if not a.startswith(f"trainer.{loop}.limit_val_batches")] + \
        [f"trainer.{loop}.limit_val_batches=3"]
    assert main(args) == 0
    val = json.load(open(run / "metrics.json"))["validation"][-1]
    diff = torch.tensor(val["rewards_tuned"]) - torch.tensor(val["rewards_base"])
    se = diff.std() / diff.numel() ** 0.5
    assert diff.mean() > 3 * se and diff.mean() > 0, (name, diff.mean().item(), se.item())
