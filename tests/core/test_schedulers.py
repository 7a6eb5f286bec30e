"""Step rules against diffusers' schedulers (the reference implementation users sample with) and
against the DDIM Gaussian written out independently here."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from nemo_aligner_draft.core.schedulers import DDIMRule, EulerRule, build_step_rule, gaussian_log_prob

# SD 1.x's noise schedule (scaled_linear betas, steps_offset 1, no clipping).
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                   set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
SHAPE = (2, 4, 8, 8)


class FakeUNet:
    """A fixed nonlinear map (x, t) -> output so a multi-step chain is non-trivial."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.a = torch.randn(SHAPE, generator=g)
        self.b = torch.randn(SHAPE, generator=g)

    def __call__(self, x, t):
        return torch.tanh(self.a * x + self.b * math.cos(float(t) / 300.0))


def _close(a, b, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.8])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_rule_matches_diffusers_ddim_over_full_schedule(prediction_type, eta, spacing):
    config = dict(SD_SCHEDULE, prediction_type=prediction_type, timestep_spacing=spacing)
    ours = DDIMRule.from_diffusers(DDIMScheduler(**config), 10)
    theirs = DDIMScheduler(**config)
    theirs.set_timesteps(10)
    assert torch.equal(ours.timesteps, theirs.timesteps.long())

    unet = FakeUNet()
    g = torch.Generator().manual_seed(1)
    x_ours = x_theirs = torch.randn(SHAPE, generator=g)
    for i, t in enumerate(theirs.timesteps):
        noise = torch.randn(SHAPE, generator=g)
        ref = theirs.step(unet(x_theirs, t), t, x_theirs, eta=eta,
                          variance_noise=noise if eta > 0 else None)
        eps, x0 = ours.split_output(unet(x_ours, ours.timesteps[i]), x_ours, i)
        step = ours.step(x_ours, eps, x0, i, noise=noise, eta=eta)
        _close(x0, ref.pred_original_sample)
        _close(step.prev_sample, ref.prev_sample)
        # Stochastic steps report a log-prob; deterministic ones have none.
        assert (step.log_prob is not None) == (eta > 0)
        x_ours, x_theirs = step.prev_sample, ref.prev_sample
    # The chain really moved: the final sample is far from the initial noise.
    assert (x_ours - torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))).abs().max() > 0.1


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_euler_rule_matches_diffusers_euler(prediction_type, spacing):
    config = dict(SD_SCHEDULE, prediction_type=prediction_type, timestep_spacing=spacing)
    config.pop("clip_sample"), config.pop("set_alpha_to_one")
    ours = EulerRule.from_diffusers(EulerDiscreteScheduler(**config), 10)
    theirs = EulerDiscreteScheduler(**config)
    theirs.set_timesteps(10)
    assert ours.init_noise_sigma() == pytest.approx(float(theirs.init_noise_sigma), rel=1e-6)

    unet = FakeUNet()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)) * ours.init_noise_sigma()
    x_ours = x_theirs = x
    for i, t in enumerate(theirs.timesteps):
        in_theirs = theirs.scale_model_input(x_theirs, t)
        in_ours = ours.scale_model_input(x_ours, i)
        _close(in_ours, in_theirs)
        ref = theirs.step(unet(in_theirs, t), t, x_theirs)
        eps, x0 = ours.split_output(unet(in_ours, ours.timesteps[i]), x_ours, i)
        _close(x0, ref.pred_original_sample, rtol=1e-5, atol=1e-4)
        x_ours = ours.step(x_ours, eps, x0, i).prev_sample
        x_theirs = ref.prev_sample
        _close(x_ours, x_theirs, rtol=1e-5, atol=1e-4)


def test_euler_split_output_eps_is_the_unet_eps_for_epsilon_models():
    rule = EulerRule.from_diffusers(EulerDiscreteScheduler(**{k: v for k, v in SD_SCHEDULE.items()
                                                             if k not in ("clip_sample", "set_alpha_to_one")}), 6)
    g = torch.Generator().manual_seed(3)
    for i in range(rule.num_steps):
        sigma = float(rule.sigmas[i])
        x = torch.randn(SHAPE, generator=g, dtype=torch.float64) * (sigma**2 + 1) ** 0.5
        unet_eps = torch.randn(SHAPE, generator=g, dtype=torch.float64)
        d, x0 = rule.split_output(unet_eps, x, i)
        # EDM's d = (x − D(x))/σ: for an ε-model D(x) = x − σ ε, so d must be ε itself.
        torch.testing.assert_close(d, unet_eps, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(x0, x - sigma * unet_eps, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("std_kind", ["per_sample", "scalar_tensor", "python_float"])
def test_gaussian_log_prob_matches_torch_normal(std_kind):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    mean = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    if std_kind == "per_sample":
        std = torch.rand(SHAPE[0], 1, 1, 1, generator=g, dtype=torch.float64) + 0.1
    elif std_kind == "scalar_tensor":
        std = torch.tensor(0.37, dtype=torch.float64)
    else:
        std = 0.37
    expected = torch.distributions.Normal(mean, torch.as_tensor(std, dtype=torch.float64)).log_prob(x)
    expected = expected.mean(dim=(1, 2, 3))
    got = gaussian_log_prob(x, mean, std)
    assert got.shape == (SHAPE[0],)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def _ddim_log_density_written_out(alphas_cumprod, timesteps, final_alpha, i, x, eps, prev, eta):
    """log N(prev; μ, σ²) of DDIM (Song et al. 2021, eq. 12/16), mean over latent dims, in float64."""
    a_t = float(alphas_cumprod[int(timesteps[i])])
    a_prev = float(alphas_cumprod[int(timesteps[i + 1])]) if i + 1 < len(timesteps) else final_alpha
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    mu = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps
    per_dim = -((prev - mu) ** 2) / (2 * sigma**2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    return per_dim.flatten(1).mean(1)


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ddim_step_log_prob_matches_formula(eta):
    sched = DDIMScheduler(**SD_SCHEDULE)
    rule = DDIMRule.from_diffusers(sched, 5)
    ref_sched = DDIMScheduler(**SD_SCHEDULE)
    ref_sched.set_timesteps(5)
    alphas = ref_sched.alphas_cumprod.double()
    final = float(ref_sched.alphas_cumprod[0])  # set_alpha_to_one=False
    g = torch.Generator().manual_seed(5)
    for i in range(rule.num_steps):
        x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
        eps = torch.randn(SHAPE, generator=g, dtype=torch.float64)
        prev = torch.randn(SHAPE, generator=g, dtype=torch.float64) * 0.5 + x * 0.9
        expected = _ddim_log_density_written_out(alphas, ref_sched.timesteps, final, i, x, eps, prev, eta)
        _, x0 = rule.split_output(eps, x, i)
        got = rule.step_log_prob(x, eps, x0, i, prev, eta)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
        # The log-prob a stochastic step reports is the density of the sample it drew.
        noise = torch.randn(SHAPE, generator=g, dtype=torch.float64)
        step = rule.step(x, eps, x0, i, noise=noise, eta=eta)
        expected_drawn = _ddim_log_density_written_out(alphas, ref_sched.timesteps, final, i, x, eps,
                                                       step.prev_sample, eta)
        torch.testing.assert_close(step.log_prob, expected_drawn, rtol=1e-9, atol=1e-9)


def test_ddim_log_prob_refuses_deterministic_step_and_euler_refuses_eta():
    rule = DDIMRule.from_diffusers(DDIMScheduler(**SD_SCHEDULE), 4)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="eta > 0"):
        rule.step_log_prob(x, x, x, 0, x, eta=0.0)
    with pytest.raises(ValueError, match="noise"):
        rule.step(x, x, x, 0, noise=None, eta=0.5)
    euler = build_step_rule(DDIMScheduler(**SD_SCHEDULE), 4, "euler")
    assert isinstance(euler, EulerRule)
    with pytest.raises(ValueError, match="eta must be 0"):
        euler.step(x, x, x, 0, eta=0.5)
    with pytest.raises(ValueError, match="sampler must be"):
        build_step_rule(DDIMScheduler(**SD_SCHEDULE), 4, "heun")


@pytest.mark.parametrize("rule_kind", ["ddim", "euler"])
def test_add_noise_matches_diffusers(rule_kind):
    """DRaFT-LV re-noises x̂0 to the last timestep; the forward process must be the scheduler's."""
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(SHAPE, generator=g)
    noise = torch.randn(SHAPE, generator=g)
    if rule_kind == "ddim":
        sched = DDIMScheduler(**SD_SCHEDULE)
        rule = DDIMRule.from_diffusers(sched, 5)
        sched.set_timesteps(5)
    else:
        cfg = {k: v for k, v in SD_SCHEDULE.items() if k not in ("clip_sample", "set_alpha_to_one")}
        sched = EulerDiscreteScheduler(**cfg)
        rule = EulerRule.from_diffusers(sched, 5)
        sched.set_timesteps(5)
    for i in (0, 2, 4):
        t = sched.timesteps[i : i + 1]
        _close(rule.add_noise(x0, noise, i), sched.add_noise(x0, noise, t))
