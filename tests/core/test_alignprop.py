"""AlignProp: which UNet outputs carry gradient under each truncation mode (tiny SD), the cut
distributions, and the reward-to-loss options."""
import pytest
import torch

from nemo_aligner_draft.backends import load_backend
from nemo_aligner_draft.core.alignprop import (
    AlignPropConfig,
    alignprop_objective,
    alignprop_plan,
    draw_cut,
    draw_detach_mask,
)

T = 5


@pytest.fixture(scope="module")
def setup(tiny_sd_dir):
    backend = load_backend(tiny_sd_dir)
    rule = backend.step_rule(T)
    cond = backend.encode_prompts(["a cat", "a dog"])
    return backend, rule, cond


class ProbedDenoiser:
    """Multiplies step i's output by a leaf scale s_i = 1: dL/ds_i ≠ 0 iff the gradient reaches that
    output. Also counts calls per step (a checkpointed step is called again in backward)."""

    def __init__(self, den, rule):
        self.den, self.rule = den, rule
        self.scale = torch.ones(rule.num_steps, requires_grad=True)
        self.calls = [0] * rule.num_steps

    def __call__(self, x, t):
        i = int((self.rule.timesteps == t).nonzero())
        self.calls[i] += 1
        return self.den(x, t) * self.scale[i]


def _run(setup, cfg, seed):
    backend, rule, cond = setup
    probe = ProbedDenoiser(backend.denoiser(cond, 2.0), rule)
    lat = backend.initial_latents(2, 64, 64, rule, generator=torch.Generator().manual_seed(0))
    lat.requires_grad_(True)
    score = lambda img: img.mean(dim=(1, 2, 3))  # noqa: E731
    loss, metrics, images = alignprop_objective(probe, None, rule, lat, backend.decode, score, cfg,
                                                cut_generator=torch.Generator().manual_seed(seed))
    if loss.requires_grad:
        loss.backward()
    expected = alignprop_plan(cfg, T, torch.Generator().manual_seed(seed))
    return probe, lat, loss, metrics, images, expected


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_per_step_redraw_detaches_outputs_but_not_the_chain(setup, seed):
    cfg = AlignPropConfig(truncation="per_step", cut_min=0, cut_max=50)
    probe, lat, loss, metrics, _, plan = _run(setup, cfg, seed)
    carried = [i for i in range(T) if probe.scale.grad is not None and probe.scale.grad[i] != 0]
    assert carried == plan.grad_steps
    assert carried != list(range(T))  # at these seeds some early outputs are detached
    assert float(metrics["grad_steps"]) == len(carried)
    assert carried  # at these seeds some outputs carry gradient
    # every step ran with autograd on and was checkpointed (called again in backward) ...
    assert probe.calls == [2] * T
    # ... and the gradient still reaches the initial latents through the chain, even though
    # step 0's output is detached
    assert 0 not in carried
    assert lat.grad is not None and lat.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["gaussian", "uniform", "fixed"])
def test_one_cut_modes_carry_gradient_from_the_cut_on(setup, mode):
    cfg = AlignPropConfig(truncation="per_rollout", cut_distribution=mode, cut_mean=30, cut_std=10, cut_min=10,
                          cut_max=40, fixed_cut=30)
    probe, lat, loss, _, _, plan = _run(setup, cfg, seed=1)
    cut = plan.grad.index(True)
    carried = [i for i in range(T) if probe.scale.grad[i] != 0]
    assert carried == list(range(cut, T))
    if mode == "fixed":
        assert cut == 3  # 30 of 50 → 3 of 5
    # steps before the cut ran once under no_grad; from the cut on, twice (checkpointing)
    assert probe.calls == [1] * cut + [2] * (T - cut)
    if cut > 0:
        assert lat.grad is None


def test_reward_to_loss_options(setup):
    backend, rule, cond = setup
    den = backend.denoiser(cond, 2.0)
    score = lambda img: img.mean(dim=(1, 2, 3)) * 10  # noqa: E731
    lat = backend.initial_latents(2, 64, 64, rule, generator=torch.Generator().manual_seed(0))
    base = AlignPropConfig(cut_distribution="fixed", fixed_cut=49)
    with torch.no_grad():
        _, m, images = alignprop_objective(den, None, rule, lat, backend.decode, score, base)
        r = score(images)
        neg, _, _ = alignprop_objective(den, None, rule, lat, backend.decode, score,
                                        AlignPropConfig(cut_distribution="fixed", loss_coeff=0.5))
        tgt, _, _ = alignprop_objective(den, None, rule, lat, backend.decode, score,
                                        AlignPropConfig(cut_distribution="fixed", loss_mode="target",
                                                        loss_target=5.0, loss_coeff=2.0))
    torch.testing.assert_close(neg, -0.5 * r.mean(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tgt, 2.0 * (r - 5.0).abs().mean(), atol=1e-6, rtol=1e-5)


def _law_of_clipped_rounded_normal(mean, std, last):
    """Mean, std and P(last) of min(max(round(N(mean, std²)), 0), last)."""
    k = torch.arange(last + 1, dtype=torch.float64)
    cdf = torch.special.ndtr((k + 0.5 - mean) / std)
    pmf = torch.diff(torch.cat([torch.zeros(1, dtype=torch.float64), cdf]))
    pmf[-1] += 1 - cdf[-1]
    mu = (pmf * k).sum()
    return float(mu), float((pmf * (k - mu) ** 2).sum().sqrt()), float(pmf[-1])


@pytest.mark.parametrize("steps", [50, 10])
def test_gaussian_cut_distribution_scaled_and_clipped(steps):
    g = torch.Generator().manual_seed(0)
    cfg = AlignPropConfig(cut_distribution="gaussian")  # 42 ± 5 of 50
    cuts = torch.tensor([draw_cut(cfg, steps, g) for _ in range(4000)], dtype=torch.float64)
    # the upper tail piles onto the last step: 42 + 1.4σ already reaches 49
    mean, std, p_last = _law_of_clipped_rounded_normal(42 * steps / 50, 5 * steps / 50, steps - 1)
    assert abs(float(cuts.mean()) - mean) < 0.05 * std + 0.02 * steps / 10
    assert abs(float(cuts.std()) - std) < 0.05 * std + 0.02
    assert abs(float((cuts == steps - 1).double().mean()) - p_last) < 0.025
    assert cuts.min() >= 0 and cuts.max() <= steps - 1
    # a wrong scaling (cuts left in units of 50 steps) would be far off
    assert abs(float(cuts.mean()) - 42) > 20 or steps == 50


def test_uniform_and_fixed_cuts():
    g = torch.Generator().manual_seed(0)
    cfg = AlignPropConfig(cut_distribution="uniform", cut_min=10, cut_max=20)
    cuts = [draw_cut(cfg, 50, g) for _ in range(2000)]
    assert min(cuts) == 10 and max(cuts) == 20 and len(set(cuts)) == 11
    assert draw_cut(AlignPropConfig(cut_distribution="fixed"), 50, g) == 49  # K = 1
    assert draw_cut(AlignPropConfig(cut_distribution="fixed"), 10, g) == 9  # 49/50·10 rounds to 10, clipped
    assert draw_cut(AlignPropConfig(cut_distribution="fixed", fixed_cut=25), 10, g) == 5
    with pytest.raises(ValueError, match="one-cut"):
        draw_cut(AlignPropConfig(truncation="per_step"), 10, g)
    with pytest.raises(ValueError, match="truncation"):
        AlignPropConfig(truncation="random")


def test_per_step_mask_frequencies():
    """P(step i detached) = P(c > i) = (hi − i)/(hi − lo + 1) with c ~ U{lo..hi}."""
    g = torch.Generator().manual_seed(0)
    cfg = AlignPropConfig(truncation="per_step", cut_min=0, cut_max=10, reference_steps=10)
    masks = torch.tensor([draw_detach_mask(cfg, 10, g) for _ in range(6000)], dtype=torch.float64)
    expected = torch.tensor([(10 - i) / 11 for i in range(10)], dtype=torch.float64)
    assert (masks.mean(0) - expected).abs().max() < 0.03
    # each step's cut is drawn afresh: masks are not monotone prefixes in general
    non_prefix = sum(1 for m in masks.bool() if m.tolist() != sorted(m.tolist(), reverse=True))
    assert non_prefix > 1000
