"""The AlignProp launch configs reach the core with the truncation and loss they name.

``model.alignprop`` validates into the core's own :class:`core.alignprop.AlignPropConfig` (no mapping in
between); the step plan it produces is checked against the recipe (K=1 recipes: gradient on the last
step only; aesthetic/hps: AlignProp's per-step redraw of the cut; the later release's gaussian cuts around
42 of 50 by override; the tiny config: the per-step redraw too).
"""
import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def typed(name, tiny_sd_dir):
    from nemo_aligner_draft.cli.train import compose
    from nemo_aligner_draft.config import load_config

    fill = [f"model.pretrained={tiny_sd_dir}"]
    if "tiny" not in name:
        fill += ["model.data.train.dataset_path=prompts.txt", "rm.model.restore_from_path=rm"]
    return load_config(compose(os.path.join(REPO, "conf"), name, fill))


def core_config(name, tiny_sd_dir):
    from nemo_aligner_draft.core.alignprop import AlignPropConfig

    cfg = typed(name, tiny_sd_dir)
    assert type(cfg.model.alignprop) is AlignPropConfig
    return cfg.model.alignprop, cfg


@pytest.mark.parametrize("name,reward,loss_mode", [("alignprop_aesthetic_k1", "aesthetic", "target"),
                                                   ("alignprop_hps_k1", "hpsv2", "negate")])
def test_k1_recipes_put_gradient_on_the_last_step_only(name, reward, loss_mode, tiny_sd_dir):
    from nemo_aligner_draft.core.alignprop import alignprop_plan

    core, cfg = core_config(name, tiny_sd_dir)
    assert cfg.rm.name == reward and core.loss_mode == loss_mode
    assert (core.truncation, core.cut_distribution) == ("per_rollout", "fixed")
    for steps in (50, 10):
        plan = alignprop_plan(core, steps, torch.Generator().manual_seed(0))
        assert plan.grad_steps == [steps - 1], (steps, plan.grad_steps)


@pytest.mark.parametrize("name", ["alignprop_aesthetic", "alignprop_hps"])
def test_random_truncation_recipes_redraw_the_cut_at_every_step(name, tiny_sd_dir):
    """AlignProp's config/align_prop.py aesthetic/hps (truncated_backprop_rand, minmax (0, 50)): a new cut
    per step, the step's UNet output detached below it; the gradient still runs along the latent chain."""
    from nemo_aligner_draft.core.alignprop import alignprop_plan

    core, cfg = core_config(name, tiny_sd_dir)
    assert (core.truncation, core.cut_min, core.cut_max) == ("per_step", 0, 50)
    assert cfg.model.infer.inference_steps == 50
    plan = alignprop_plan(core, 50, torch.Generator().manual_seed(0))
    assert all(plan.grad) and any(plan.detach_output) and not all(plan.detach_output)


def test_gaussian_cuts_of_the_later_release_are_one_override_away(tiny_sd_dir):
    """The 2024-10 rewrite's one gaussian cut per rollout (42 ± 5 of 50), as its header comment says."""
    from nemo_aligner_draft.cli.train import compose
    from nemo_aligner_draft.config import load_config
    from nemo_aligner_draft.core.alignprop import draw_cut

    fill = [f"model.pretrained={tiny_sd_dir}", "model.data.train.dataset_path=prompts.txt", "rm.model.restore_from_path=rm",
            "model.alignprop.truncation=per_rollout", "+model.alignprop.cut_distribution=gaussian",
            "+model.alignprop.cut_mean=42", "+model.alignprop.cut_std=5"]
    core = load_config(compose(os.path.join(REPO, "conf"), "alignprop_aesthetic", fill)).model.alignprop
    g = torch.Generator().manual_seed(0)
    cuts = torch.tensor([draw_cut(core, 50, g) for _ in range(400)], dtype=torch.float64)
    assert abs(cuts.mean().item() - 42.0) < 1.0 and 4.0 < cuts.std().item() < 6.0


def test_aesthetic_recipe_loss_is_coefficient_times_distance_to_target(tiny_sd_dir):
    from nemo_aligner_draft.core.losses import reward_to_loss

    core, _ = core_config("alignprop_aesthetic", tiny_sd_dir)
    r = torch.tensor([6.0, 12.0])
    loss = reward_to_loss(r, core.loss_mode, core.loss_target, core.loss_coeff)
    assert torch.isclose(loss, torch.tensor(0.01 * (4.0 + 2.0) / 2))


def test_tiny_config_uses_the_original_per_step_redraw(tiny_sd_dir):
    from nemo_aligner_draft.core.alignprop import alignprop_plan

    core, _ = core_config("alignprop_tiny", tiny_sd_dir)
    assert core.truncation == "per_step"
    plan = alignprop_plan(core, 10, torch.Generator().manual_seed(3))
    assert all(plan.grad), "per-step redraw keeps every step on the autograd tape"
    assert any(plan.detach_output) and not all(plan.detach_output)
