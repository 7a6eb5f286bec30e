"""Annealed importance guidance: schedules against their formulas, the mix at w = 0/1/between, and
the step-index lookup inside a full sampler run."""
import pytest
import torch
from diffusers import DDIMScheduler

from nemo_aligner_draft.core.aig import AIGDenoiser, aig_combine, aig_weights
from nemo_aligner_draft.core.sampler import StepPlan, sample
from nemo_aligner_draft.core.schedulers import DDIMRule


def _rule(steps=5):
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          set_alpha_to_one=False, steps_offset=1, clip_sample=False)
    return DDIMRule.from_diffusers(sched, steps)


def base(x, t):
    return 0.1 * x + 0.001 * t.float()


def finetuned(x, t):
    return -0.2 * x + 0.5


def test_schedules():
    f64 = dict(dtype=torch.float64)
    torch.testing.assert_close(aig_weights(5, "linear"), torch.tensor([0, 0.25, 0.5, 0.75, 1], **f64))
    torch.testing.assert_close(aig_weights(5, "power_2"), torch.tensor([0, 0.0625, 0.25, 0.5625, 1], **f64))
    torch.testing.assert_close(aig_weights(5, "power_0.5"), torch.tensor([0, 0.25, 0.5, 0.75, 1], **f64).sqrt())
    torch.testing.assert_close(aig_weights(5, "step_0.5"), torch.tensor([0, 0, 1, 1, 1], **f64))
    torch.testing.assert_close(aig_weights(5, "step_0.6"), torch.tensor([0, 0, 0, 1, 1], **f64))
    torch.testing.assert_close(aig_weights(3, "constant_0.3"), torch.full((3,), 0.3, **f64))
    torch.testing.assert_close(aig_weights(1, "linear"), torch.ones(1, **f64))
    w = aig_weights(20, "power_3")
    assert (w[1:] >= w[:-1]).all() and w[0] == 0 and w[-1] == 1
    for bad in ["cosine", "power_x", "power_-1", "step_2", "linear_2"]:
        with pytest.raises(ValueError, match="AIG schedule"):
            aig_weights(5, bad)


def test_mix_endpoints_and_middle():
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor(500)
    torch.testing.assert_close(aig_combine(base(x, t), finetuned(x, t), 0.0), base(x, t))
    torch.testing.assert_close(aig_combine(base(x, t), finetuned(x, t), 1.0), finetuned(x, t))
    torch.testing.assert_close(aig_combine(base(x, t), finetuned(x, t), 0.25),
                               0.75 * base(x, t) + 0.25 * finetuned(x, t))


def test_denoiser_uses_each_steps_weight():
    rule = _rule(5)
    aig = AIGDenoiser(base, finetuned, rule, "power_2")
    x = torch.randn(1, 4, 8, 8)
    for i, w in enumerate([0, 0.0625, 0.25, 0.5625, 1]):
        t = rule.timesteps[i]
        torch.testing.assert_close(aig(x, t), (1 - w) * base(x, t) + w * finetuned(x, t))
    with pytest.raises(ValueError, match="not one of the sampler's timesteps"):
        aig(x, torch.tensor(123))


def test_full_sampler_run():
    rule = _rule(5)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plan = StepPlan.no_grad(5)
    run = lambda den: sample(den, rule, x_T, plan).latents  # noqa: E731
    torch.testing.assert_close(run(AIGDenoiser(base, finetuned, rule, "constant_0")), run(base), rtol=0, atol=0)
    torch.testing.assert_close(run(AIGDenoiser(base, finetuned, rule, "constant_1")), run(finetuned), rtol=0, atol=0)
    # a step schedule: base for steps 0-1, fine-tuned for 2-4 — the same as switching by hand
    switch = lambda x, t: base(x, t) if int(t) in rule.timesteps[:2].tolist() else finetuned(x, t)  # noqa: E731
    torch.testing.assert_close(run(AIGDenoiser(base, finetuned, rule, "step_0.5")), run(switch))
    mixed = run(AIGDenoiser(base, finetuned, rule, "linear"))
    assert (mixed - run(base)).abs().max() > 1e-3 and (mixed - run(finetuned)).abs().max() > 1e-3
