"""The recipe configs taken from the reference implementations: they load through the real compose +
validation path (which rejects unknown keys), name the file and commit they follow, and hold the values
that define the recipes. Two of them also train one step on the tiny random SD through the real CLI.

References (each config's header says which function of which file):
AlignProp github:mihirp1998/AlignProp config/align_prop.py @ a831a5fb; trl DDPO github:huggingface/trl
examples/scripts/ddpo.py + trl/trainer/ddpo_config.py @ v0.23.1 (4529a1c8); SDPO github:ZiyiZhang27/sdpo
config/config_sdpo.py + config/base_sdpo.py @ fcee34db.
"""
import os

import pytest
import torch
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONF = os.path.join(REPO, "conf")

ALIGNPROP = "a831a5fb3a644817957f334f4dd2d8971e3c550b"
TRL = "4529a1c8b1813480a85b02c9c8e7f75a29085d65"
SDPO = "fcee34db05c0beead0d76b58b09f843af821c68e"
NEMO_ALIGNER = "af2b3bd96ad78190f6ebfb552b9e599e313ce027"
FLOW_GRPO = "31c71b9d"  # github:yifan123/flow_grpo config/grpo.py 31c71b9dc2c31e684cb547e464c941094140ac19
RECIPES = {
    "alignprop_aesthetic": ALIGNPROP, "alignprop_aesthetic_k1": ALIGNPROP, "alignprop_hps": ALIGNPROP,
    "alignprop_hps_k1": ALIGNPROP, "alignprop_evaluate": ALIGNPROP, "alignprop_evaluate_soup": ALIGNPROP,
    "ddpo_trl_aesthetic": TRL, "sdpo_aesthetic": SDPO, "sdpo_imagereward": SDPO, "sdpo_hpsv2": SDPO,
    "sdpo_pickscore": SDPO, "sdpo_sd": "fcee34db", "draftp_sd": NEMO_ALIGNER, "draftp_sdxl": NEMO_ALIGNER,
    "grpo_sd": FLOW_GRPO,
}
FILL = {"model.pretrained": "/models/sd", "model.data.train.dataset_path": "prompts.txt",
        "rm.model.restore_from_path": "/models/rm"}


def _required(name):
    """The ``???`` keys of the composed file, with a value for each."""
    from omegaconf import OmegaConf

    from nemo_aligner_draft.cli.train import compose

    plain = OmegaConf.to_container(compose(CONF, name, []), resolve=False)
    out = []
    for key, value in FILL.items():
        node = plain
        for part in key.split("."):
            node = node[part]
        if node == "???":
            out.append(f"{key}={value}")
    return out


def typed(name, *overrides):
    from nemo_aligner_draft.cli.train import compose
    from nemo_aligner_draft.config import load_config

    return load_config(compose(CONF, name, [*_required(name), *overrides]))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_loads_and_names_its_reference(name):
    from nemo_aligner_draft.config import ConfigError

    cfg = typed(name)
    assert cfg.name == name and not cfg.notices_given
    header = "".join(ln for ln in open(os.path.join(CONF, f"{name}.yaml"), encoding="utf-8")
                     if ln.startswith("#"))
    assert RECIPES[name] in header, f"{name}.yaml does not name the commit it follows"
    # the loader is a real check: a key the schema does not have is refused, naming it
    with pytest.raises(ConfigError, match="model.infer.no_such_key"):
        typed(name, "+model.infer.no_such_key=1")


def test_the_required_paths_stay_required():
    for name in RECIPES:
        assert "model.pretrained=/models/sd" in _required(name), name
    for name in ("alignprop_aesthetic", "alignprop_hps_k1", "sdpo_imagereward", "sdpo_pickscore",
                 "ddpo_trl_aesthetic", "alignprop_evaluate_soup"):
        assert "rm.model.restore_from_path=/models/rm" in _required(name), name


# --------------------------------------------------------------------------- AlignProp
@pytest.mark.parametrize("name,reward,epochs", [("alignprop_aesthetic", "aesthetic", 7),
                                                ("alignprop_aesthetic_k1", "aesthetic", 7),
                                                ("alignprop_hps", "hpsv2", 200), ("alignprop_hps_k1", "hpsv2", 200)])
def test_alignprop_recipes_hold_align_prop_py_values(name, reward, epochs):
    cfg = typed(name)
    m, ap = cfg.model, cfg.model.alignprop
    assert cfg.rm.name == reward and str(cfg.trainer.precision) == "16-mixed" and m.seed == 42
    # total_batch_size 128 per optimizer step, 256 samples (2 steps) per epoch, per_gpu_capacity 4
    assert (m.micro_batch_size, m.global_batch_size) == (4, 128)
    assert cfg.loop.max_steps == cfg.trainer.max_steps == epochs * 256 // 128
    assert (m.optim.name, m.optim.lr, m.optim.weight_decay, m.optim.betas) == ("adamw", 1e-3, 0.1, [0.9, 0.999])
    assert cfg.loop.gradient_clip_val == 5.0 and cfg.loop.val_check_interval == 1
    inf = m.infer
    assert (inf.unconditional_guidance_scale, inf.inference_steps, inf.eta, inf.height, inf.width, inf.sampler) \
        == (7.5, 50, 0.0, 512, 512, "ddim")
    lora = m.peft.lora_tuning
    assert (lora.adapter_dim, lora.network_alpha, lora.target_modules) == (4, 4, ["to_q", "to_k", "to_v", "to_out.0"])
    assert m.kl_coeff == 0.0 and m.decode_target == "x0" and ap.loss_coeff == 0.01
    assert (ap.loss_mode, ap.loss_target) == (("target", 10.0) if reward == "aesthetic" else ("negate", 0.0))


@pytest.mark.parametrize("name", ["alignprop_aesthetic_k1", "alignprop_hps_k1"])
def test_alignprop_k1_recipes_backpropagate_through_the_last_step_only(name):
    from nemo_aligner_draft.core.alignprop import alignprop_plan

    ap = typed(name).model.alignprop
    assert (ap.truncation, ap.cut_distribution, ap.fixed_cut) == ("per_rollout", "fixed", 49)
    assert alignprop_plan(ap, 50, torch.Generator().manual_seed(0)).grad_steps == [49]


@pytest.mark.parametrize("name", ["alignprop_aesthetic", "alignprop_hps"])
def test_alignprop_random_truncation_redraws_a_cut_in_0_to_50_at_every_step(name):
    from nemo_aligner_draft.core.alignprop import draw_detach_mask

    ap = typed(name).model.alignprop
    assert (ap.truncation, ap.cut_min, ap.cut_max, ap.reference_steps) == ("per_step", 0, 50, 50)
    g = torch.Generator().manual_seed(0)
    masks = torch.tensor([draw_detach_mask(ap, 50, g) for _ in range(2000)], dtype=torch.float64)
    # truncated_backprop_rand: P(step i detached) = P(i < U{0..50}) = (50 − i) / 51
    expected = torch.tensor([(50 - i) / 51 for i in range(50)], dtype=torch.float64)
    assert (masks.mean(0) - expected).abs().max() < 0.05


def test_alignprop_evaluate_recipes_render_40_images():
    for name, prompts_of in (("alignprop_evaluate", "eval_simple_animals"), ("alignprop_evaluate_soup", "simple_animals")):
        cfg = typed(name)
        assert cfg.loop.limit_val_batches * cfg.model.micro_batch_size == 40, name
        assert cfg.model.seed == 42 and cfg.model.infer.inference_steps == 50 and cfg.rm.name == "aesthetic"
        assert prompts_of in open(os.path.join(CONF, f"{name}.yaml")).read()
    soup = typed("alignprop_evaluate_soup").soup
    assert (soup.alpha, soup.mode) == (0.0, "factors")  # mixing_coef_1 0.0; both factors mixed


# --------------------------------------------------------------------------- trl DDPO
def test_trl_ddpo_recipe_holds_the_example_and_ddpoconfig_values():
    cfg = typed("ddpo_trl_aesthetic")
    m, d = cfg.model, cfg.model.ddpo
    assert d.clip_range == 1e-4 and d.adv_clip_max == 5.0 and d.timestep_fraction == 1.0 and d.num_inner_epochs == 1
    assert d.per_prompt_stat_tracking and (d.stat_buffer_size, d.stat_min_count) == (32, 16)
    # --sample_batch_size 6 × --sample_num_batches_per_epoch 4 samples per epoch; an optimizer step every
    # --train_batch_size 3 samples; --num_epochs 200
    assert m.micro_batch_size * d.num_sample_batches == 6 * 4
    assert m.micro_batch_size == 3 and d.train_micro_batch_size == 3
    assert cfg.loop.max_steps == 200 * d.num_sample_batches * d.num_inner_epochs
    inf = m.infer
    assert (inf.inference_steps, inf.eta, inf.unconditional_guidance_scale, inf.sampler) == (50, 1.0, 5.0, "ddim")
    assert (m.optim.name, m.optim.lr, m.optim.weight_decay) == ("adamw", 3e-4, 1e-4)
    assert cfg.loop.gradient_clip_val == 1.0 and m.seed == 0 and str(cfg.trainer.precision) == "16-mixed"
    lora = m.peft.lora_tuning
    assert (lora.adapter_dim, lora.network_alpha, sorted(lora.target_modules)) == \
        (4, 4, sorted(["to_k", "to_q", "to_v", "to_out.0"]))
    assert m.data.train.dataset_path == "builtin:trl_animals" and cfg.rm.name == "aesthetic" and cfg.rm.fp32


def test_trl_animals_is_the_examples_list_and_animals_is_unchanged():
    from nemo_aligner_draft.data.prompts import load_prompts

    trl = load_prompts("builtin:trl_animals")
    assert len(trl) == 27 and (trl[0], trl[1], trl[-1]) == ("cat", "dog", "kangaroo") and len(set(trl)) == 27
    assert all(" " not in p for p in trl), "trl's prompt_fn returns the bare animal name"
    animals = load_prompts("builtin:animals")  # other configs and tests use it
    assert len(animals) == 12 and animals[0] == "a photo of a cat"


# --------------------------------------------------------------------------- SDPO
# recipe: (lr, pairs per optimizer step = train.batch_size × gradient_accumulation_steps, train.batch_size, epochs)
SDPO_RECIPES = {"sdpo_aesthetic": (1e-4, 16, 2, 100), "sdpo_imagereward": (5e-5, 32, 1, 200),
                "sdpo_hpsv2": (5e-5, 32, 1, 200), "sdpo_pickscore": (6e-5, 16, 1, 200)}


@pytest.mark.parametrize("name", sorted(SDPO_RECIPES))
def test_sdpo_recipes_hold_config_sdpo_py_values(name):
    lr, per_step, train_bs, epochs = SDPO_RECIPES[name]
    cfg = typed(name)
    m, s = cfg.model, cfg.model.sdpo
    assert cfg.rm.name == name.removeprefix("sdpo_") and cfg.rm.fp32
    assert m.optim.lr == lr and m.optim.weight_decay == 1e-4 and m.optim.name == "adamw"
    assert m.micro_batch_size == per_step and s.train_micro_batch_size == train_bs
    assert m.micro_batch_size * s.num_sample_batches == 8 * 4  # sample.batch_size × num_batches_per_epoch
    assert cfg.loop.max_steps == epochs * s.num_sample_batches
    inf = m.infer
    assert (inf.inference_steps, inf.eta, inf.unconditional_guidance_scale) == (50, 1.0, 1.0)
    assert (s.gamma, s.lam, s.log_scale, s.clip_range, s.adv_clip_max, s.timestep_fraction) == \
        (0.99, 0.99, 1.0, 1e-4, 5.0, 1.0)
    assert s.per_prompt_stat_tracking and (s.stat_buffer_size, s.stat_min_count) == (32, 16)
    assert cfg.loop.gradient_clip_val == 1.0 and m.seed == 42 and m.peft.lora_tuning.adapter_dim == 4


def test_sdpo_sd_is_the_pickscore_recipe():
    from omegaconf import OmegaConf

    from nemo_aligner_draft.cli.train import compose

    def plain(name):
        raw = OmegaConf.to_container(compose(CONF, name, _required(name)), resolve=True)
        raw.pop("name")
        raw["exp_manager"].pop("name")
        return raw

    assert plain("sdpo_sd") == plain("sdpo_pickscore")


def test_grpo_sd_holds_flow_grpo_pickscore_values():
    """Flow-GRPO's pickscore_sd3 (config/grpo.py over config/base.py @ 31c71b9d; LoRA from scripts/train_sd3.py
    @ 1f4ca40d): 24 images per prompt, 10 training steps, 40 evaluation steps, guidance 4.5, β 0.01, clip 1e-4,
    adv clip 5, timestep fraction 0.99, global std, lr 3e-4, weight decay 1e-4, LoRA r 32 / alpha 64."""
    cfg = typed("grpo_sd")
    m, g = cfg.model, cfg.model.grpo
    assert (g.group_size, g.rollout_steps, m.infer.inference_steps, m.infer.unconditional_guidance_scale) == (24, 10, 40, 4.5)
    assert (g.kl_coeff, g.clip_range, g.adv_clip_max, g.timestep_fraction, g.global_std) == (0.01, 1e-4, 5.0, 0.99, True)
    assert (m.optim.lr, m.optim.weight_decay, m.peft.lora_tuning.adapter_dim, m.peft.lora_tuning.network_alpha) == \
        (3e-4, 1e-4, 32, 64)
    assert (m.infer.height, m.infer.width, m.infer.eta, cfg.algorithm.name) == (512, 512, 1.0, "grpo")


# --------------------------------------------------------------------------- one step through the CLI
@pytest.fixture(scope="module")
def tiny_aesthetic(tmp_path_factory):
    """The shipped configs' rm section (rm.name aesthetic, rm.kwargs.clip_path) then runs as it is."""
    from nemo_aligner_draft.testing.tiny import save_tiny_aesthetic

    return save_tiny_aesthetic(str(tmp_path_factory.mktemp("aesthetic")))


_ALIGNPROP_TINY = ["model.data.train.dataset_path=builtin:animals", "model.micro_batch_size=2",
                   "model.global_batch_size=2", "trainer.alignprop.limit_val_batches=1"]
TINY = {
    "alignprop_aesthetic": _ALIGNPROP_TINY,
    "alignprop_aesthetic_k1": _ALIGNPROP_TINY,
    "ddpo_trl_aesthetic": ["model.ddpo.num_sample_batches=2"],
    "sdpo_aesthetic": ["model.data.train.dataset_path=builtin:animals", "model.micro_batch_size=2",
                       "model.global_batch_size=2", "model.sdpo.num_sample_batches=1",
                       "model.sdpo.train_micro_batch_size=1", "model.sdpo.eval_steps=[1,2]",
                       "trainer.sdpo.val_check_interval=1", "trainer.sdpo.limit_val_batches=1"],
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_recipe_trains_one_step_on_the_tiny_model(name, tiny_sd_dir, tiny_aesthetic, tmp_path):
    """The shipped file with only sizes, device and paths overridden trains (DDPO/SDPO: one PPO epoch), and
    every key it holds was read by code."""
    import json

    from nemo_aligner_draft.cli.train import main
    from nemo_aligner_draft.testing.config import yaml_leaves
    from nemo_aligner_draft.typed import track_reads

    loop = name.split("_")[0]
    clip, head = tiny_aesthetic
    run = tmp_path / "run"
    args = [f"--config-name={name}", f"model.pretrained={tiny_sd_dir}", f"exp_manager.explicit_log_dir={run}",
            "trainer.accelerator=cpu", "trainer.precision=32", "trainer.max_steps=1", f"trainer.{loop}.max_steps=1",
            f"trainer.{loop}.save_interval=1", "model.infer.inference_steps=2", "model.infer.height=64",
            "model.infer.width=64", f"rm.model.restore_from_path={head}", f"rm.kwargs.clip_path={clip}", *TINY[name]]
    with track_reads() as reads:
        assert main(args) == 0
    metrics = json.load(open(run / "metrics.json"))
    last = metrics["train"][-1]
    if loop == "alignprop":
        assert last["grad_steps"] >= 1 and metrics["validation"]
    else:
        assert "clipfrac" in last and last["samples_seen"] > 0
    if name.startswith("sdpo"):
        assert {"reward_steps1", "reward_steps2"} <= set(metrics["validation"][-1])
    raw = yaml.safe_load(open(os.path.join(CONF, f"{name}.yaml")))
    unread = sorted(k for k in yaml_leaves(raw) if k not in set(reads))
    assert not unread, f"{name}: keys nothing read: {unread}"
