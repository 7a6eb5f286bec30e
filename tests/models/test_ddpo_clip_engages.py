"""At each shipped DDPO config's PPO settings the clip engages: the logged ``clipfrac`` is > 0 within
the first PPO epoch, where the earlier default ``clip_range: 0.1`` leaves it at 0.

The log-prob is the DDIM-step Gaussian's log-density *averaged* over latent dimensions (as in
ddpo-pytorch and trl), so the ratio is exp(mean Δ log p): one update moves it by ~1e-3, far inside a
0.1 trust region and outside a 1e-4 one (the references' value).

Each ``conf/ddpo_*.yaml`` but the tiny one is composed as the CLI composes it and trained for one PPO
epoch on the tiny random SD pipeline, with the file's ``clip_range``, ``adv_clip_max``, learning rate and
schedule, optimizer, guidance scale, eta, LoRA, ``timestep_fraction``, ``num_sample_batches`` and
``num_inner_epochs`` (so as many optimizer steps per epoch as the file takes; at least 2, since the first
update is on-policy with ratio 1 and cannot clip). Only sizes shrink: 64×64 images, 4 sampler steps,
train micro-batches of 1 sample (as many per optimizer step as the file has), fp32 on CPU, and the
``brightness`` reward in place of the file's (which needs downloaded weights or a GPU-sized image).
"""
import glob
import os

import pytest
from omegaconf import OmegaConf

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONF = os.path.join(REPO, "conf")
SHIPPED = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONF, "ddpo_*.yaml"))
                 if os.path.basename(p) != "ddpo_tiny.yaml")
PREVIOUS_DEFAULT = 0.1


def test_the_sd_config_is_among_the_shipped():
    assert "ddpo_sd" in SHIPPED, SHIPPED


def tiny_overrides(name, sd_dir):
    """Overrides that shrink ``name``'s sizes and nothing that shapes a PPO update."""
    raw = OmegaConf.load(os.path.join(CONF, name + ".yaml"))
    m, pg = raw.model, raw.model.ddpo
    assert m.algorithm == "ddpo"
    per_step = max(int(m.micro_batch_size) // int(pg.train_micro_batch_size), 1)  # train micro-batches per step
    micro = max(per_step, 2)  # 1-sample batches would have zero batch-normalised advantages
    batches = int(pg.num_sample_batches) if int(pg.num_sample_batches) * int(pg.num_inner_epochs) >= 2 else 2
    prompts = "builtin:animals" if micro * batches <= 12 else "builtin:embedded_train"
    return [f"model.pretrained={sd_dir}", "model.family=auto", "model.peft.restore_from_path=null",
            "trainer.precision=32", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=1",
            "trainer.strategy=auto", "trainer.ddpo.val_check_interval=0",
            "model.infer.height=64", "model.infer.width=64", "model.infer.inference_steps=4",
            f"model.micro_batch_size={micro}", f"model.global_batch_size={micro}",
            "model.ddpo.train_micro_batch_size=1", f"model.ddpo.num_sample_batches={batches}",
            f"model.data.train.dataset_path={prompts}", "model.data.validation.dataset_path=null",
            "rm.name=brightness", "rm.model.restore_from_path=null", "rm.components=[]",
            *(["~rm.kwargs"] if "kwargs" in raw.get("rm", {}) else [])]  # Hydra merges `rm.kwargs={}` into it


def train_one_epoch(name, sd_dir, extra=()):
    """One PPO epoch through the shell under the CLI's Trainer; the metrics each optimizer step logged."""
    from nemo_aligner_draft.algorithms.optimizer_step import OptimizerStep
    from nemo_aligner_draft.cli.train import build_reward_from_config, build_trainer, compose
    from nemo_aligner_draft.config import load_config
    from nemo_aligner_draft.data.prompts import load_prompts
    from nemo_aligner_draft.models.base import AlignmentModel

    dict_cfg = compose(CONF, name, [*tiny_overrides(name, sd_dir), *extra])
    cfg = load_config(dict_cfg)
    model = AlignmentModel(cfg=OmegaConf.create(OmegaConf.to_container(dict_cfg.model, resolve=True)),
                           config=cfg.model, loop=cfg.loop, reward=build_reward_from_config(cfg.rm),
                           train_prompts=load_prompts(cfg.model.data.train.dataset_path), precision="32")
    pg = model.recipe.pg
    steps = pg.num_inner_epochs * pg.num_sample_batches  # optimizer steps in one PPO epoch
    logged = []
    finish = OptimizerStep.finish

    def record(self, extra=None):
        logs = finish(self, extra)
        logged.append(logs)
        return logs

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(OptimizerStep, "finish", record)
        trainer = build_trainer(cfg, max_steps=steps, accumulation=1)
        trainer.fit(model)
    assert len(logged) == steps and all(logs is not None for logs in logged), "a step was skipped"
    assert model.recipe.ppo_epochs == 1
    # what finish returned is what went to the loggers
    assert float(trainer.callback_metrics["clipfrac"]) == logged[-1]["clipfrac"]
    return model, [logs["clipfrac"] for logs in logged]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_clip_range_engages_in_the_first_epoch(name, tiny_sd_dir):
    shipped = OmegaConf.load(os.path.join(CONF, name + ".yaml")).model
    model, clipfrac = train_one_epoch(name, tiny_sd_dir)
    # the run used the file's PPO settings, not a default or an override
    assert model.recipe.pg.clip_range == shipped.ddpo.clip_range
    assert model.recipe.pg.adv_clip_max == shipped.ddpo.adv_clip_max
    assert model.mcfg.optim.lr == shipped.optim.lr
    assert len(clipfrac) >= 2

    _, clipfrac_previous = train_one_epoch(name, tiny_sd_dir, [f"model.ddpo.clip_range={PREVIOUS_DEFAULT}"])
    print(f"\n{name}: clipfrac per optimizer step at clip_range {shipped.ddpo.clip_range}: {clipfrac}; "
          f"at {PREVIOUS_DEFAULT}: {clipfrac_previous}")
    assert clipfrac[0] == 0.0 and clipfrac_previous[0] == 0.0, "the first update is on-policy (ratio 1)"
    assert max(clipfrac[1:]) > 0, (f"{name}: clip_range {shipped.ddpo.clip_range} never clipped in one PPO "
                                   f"epoch (clipfrac per step {clipfrac}): the PPO trust region does nothing")
    assert max(clipfrac_previous) == 0.0, clipfrac_previous
