"""The rectified-flow step rule (SD3, FLUX) against diffusers' ``FlowMatchEulerDiscreteScheduler`` and,
for its SDE form, against the exact marginals of a Gaussian data distribution.

For data x0 ~ N(m, s²) (per dimension) the flow x_σ = (1 − σ)·x0 + σ·ε has the Gaussian marginals
N((1 − σ)·m, V_σ), V_σ = (1 − σ)²s² + σ², and the exact velocity field is known in closed form:
v(x, σ) = E[ε − x0 | x_σ = x] = (σ − (1 − σ)s²)/V_σ · (x − (1 − σ)m) − m. Sampling from σ = 1 with that
v, the ODE and the SDE must both land on the marginals at every step (up to discretisation and Monte
Carlo error), which is what "the SDE has the ODE's marginals" means.
"""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from nemo_aligner_draft.core.schedulers import FlowMatchRule, build_step_rule

SD3_SCHED = dict(num_train_timesteps=1000, shift=3.0)  # stabilityai/stable-diffusion-3-medium-diffusers
FLUX_SCHED = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                  max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)  # black-forest-labs/FLUX.1-dev


def _velocity_net(seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    return lambda x, t: torch.tanh(a * x + b * math.cos(float(t) / 300.0))


@pytest.mark.parametrize("sched_cfg,kwargs", [
    (SD3_SCHED, {}),
    (FLUX_SCHED, {"mu": 0.8, "sigmas": [1.0 - k / 7 for k in range(7)]}),  # as FluxPipeline passes them
])
def test_ode_step_equals_diffusers(sched_cfg, kwargs):
    """eta = 0: every step and the whole chain equal FlowMatchEulerDiscreteScheduler.step."""
    sched = FlowMatchEulerDiscreteScheduler(**sched_cfg)
    rule = build_step_rule(sched, 7, "flow", **kwargs)
    ref = FlowMatchEulerDiscreteScheduler.from_config(sched.config)
    ref.set_timesteps(7, **({"mu": kwargs["mu"], "sigmas": kwargs["sigmas"]} if kwargs else {}))
    torch.testing.assert_close(rule.timesteps, ref.timesteps)
    net = _velocity_net()
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    ours = x.clone()
    for i, t in enumerate(ref.timesteps):
        v = net(x, t)
        x = ref.step(v, t, x).prev_sample
        vo = net(ours, rule.timesteps[i])
        vel, x0 = rule.split_output(vo, ours, i)
        ours = rule.step(ours, vel, x0, i).prev_sample
        torch.testing.assert_close(ours, x, rtol=0, atol=1e-6)
    assert rule.sigmas[0] == 1.0 and rule.sigmas[-1] == 0.0


def test_split_output_and_add_noise_are_the_interpolation():
    """x̂0 = x − σv inverts x_σ = (1 − σ)x0 + σε when v = ε − x0, at every step."""
    rule = FlowMatchRule.from_diffusers(FlowMatchEulerDiscreteScheduler(**SD3_SCHED), 5)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    for i in range(5):
        x = rule.add_noise(x0, eps, i)
        v, x0_hat = rule.split_output(eps - x0, x, i)
        torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-5)
        torch.testing.assert_close(v, eps - x0)


def _gaussian_flow(m, s):
    def v(x, sigma):
        var = (1 - sigma) ** 2 * s**2 + sigma**2
        return (sigma - (1 - sigma) * s**2) / var * (x - (1 - sigma) * m) - m
    return v


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_sde_keeps_the_flow_marginals(eta):
    """From σ = 1, the ODE (eta 0) and the SDE (eta 0.7) both follow N((1 − σ)m, V_σ) on SD3's shifted
    schedule, checked at every step with σ ≤ 0.9 and at σ = 0. 40 000 samples: Monte Carlo SE of the mean
    ~0.005·√V, of the variance ~0.7 %. Measured on 200 steps: max |Δmean| 0.011 (ODE) / 0.012 (SDE), max
    relative |ΔV| 2.3 % / 3.3 % (the ODE's is the last Euler step into σ = 0). Near σ = 1 the SDE
    overshoots the variance by ~11 %: its first step uses the second σ in g's denominator (g is infinite
    at σ = 1), a deviation the later steps remove."""
    m, s = 1.5, 0.4
    rule = FlowMatchRule.from_diffusers(FlowMatchEulerDiscreteScheduler(**SD3_SCHED), 200)
    vel = _gaussian_flow(m, s)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40000, 1, 1, 1, generator=g, dtype=torch.float64)
    worst_mean, worst_var = 0.0, 0.0
    for i in range(rule.num_steps):
        sigma = float(rule.sigmas[i])
        v = vel(x, sigma)
        noise = torch.randn(x.shape, generator=g, dtype=x.dtype) if eta > 0 else None
        out = rule.step(x, v, x - sigma * v, i, noise=noise, eta=eta)
        x = out.prev_sample
        if eta > 0:
            assert out.log_prob is not None and out.log_prob.shape == (40000,)
        nxt = float(rule.sigmas[i + 1])
        want_mean, want_var = (1 - nxt) * m, (1 - nxt) ** 2 * s**2 + nxt**2
        if nxt <= 0.9:
            worst_mean = max(worst_mean, abs(float(x.mean()) - want_mean))
            worst_var = max(worst_var, abs(float(x.var()) / want_var - 1))
    assert worst_mean < 0.03, worst_mean
    assert worst_var < 0.06, worst_var
    # at σ = 0 the samples are the data distribution
    assert abs(float(x.mean()) - m) < 0.02 and abs(float(x.std()) - s) < 0.02


def test_sde_step_log_prob_is_the_gaussian_written_out():
    """step() and step_log_prob() give log N(x'; x + dσ[v + g²/(2σ)(x + (1 − σ)v)], g²|dσ|),
    g = a·√(σ/(1 − σ)) (the second σ in the denominator at σ = 1), averaged over dimensions."""
    rule = FlowMatchRule.from_diffusers(FlowMatchEulerDiscreteScheduler(**SD3_SCHED), 6)
    a = 0.7
    g = torch.Generator().manual_seed(3)
    x, v = torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64), torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64)
    for i in range(6):
        s, s_next = float(rule.sigmas[i]), float(rule.sigmas[i + 1])
        gi = a * math.sqrt(s / (1 - (s if s < 1 else float(rule.sigmas[1]))))
        ds = s_next - s
        mean = x + ds * (v + gi**2 / (2 * s) * (x + (1 - s) * v))
        std = gi * math.sqrt(-ds)
        noise = torch.randn(x.shape, generator=g, dtype=x.dtype)
        out = rule.step(x, v, x - s * v, i, noise=noise, eta=a)
        torch.testing.assert_close(out.prev_sample, mean + std * noise)
        want = torch.distributions.Normal(mean, std).log_prob(out.prev_sample).mean(dim=(1, 2, 3))
        torch.testing.assert_close(out.log_prob, want)
        torch.testing.assert_close(rule.step_log_prob(x, v, None, i, out.prev_sample, a), want)


def test_deterministic_rule_refuses_log_probs():
    rule = FlowMatchRule.from_diffusers(FlowMatchEulerDiscreteScheduler(**SD3_SCHED), 4)
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="eta > 0"):
        rule.step_log_prob(x, x, x, 0, x, 0.0)
    with pytest.raises(ValueError, match="needs `noise`"):
        rule.step(x, x, x, 0, noise=None, eta=0.5)
