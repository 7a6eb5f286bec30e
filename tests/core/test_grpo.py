"""GRPO's core against explicit, hand-written computations.

The gradient test writes the policy density of each sampler step out by hand, per sample, in a plain
Python loop — DDIM (Song et al. 2021 eq. 12 with eta) and the flow SDE (mean x + dσ[v + g²/(2σ)ε̂], std
g√|dσ|) — and the GRPO objective on top of it (clipped ratio, advantages clipped, β·KL of two Gaussians
of the same std), then compares autograd's gradient of that with :func:`grpo_step_loss`'s.
"""
import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from nemo_aligner_draft.core.ddpo import ddpo_rollout
from nemo_aligner_draft.core.grpo import GRPOConfig, group_advantages, grpo_step_loss
from nemo_aligner_draft.core.schedulers import DDIMRule, FlowMatchRule

SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                   set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
SHAPE = (4, 2, 3, 3)


def test_group_advantages_explicit_loop():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(12, generator=g, dtype=torch.float64) * 3 + 1
    for global_std in (False, True):
        got = group_advantages(r, 3, global_std=global_std)
        allr = r.tolist()
        mu_all = sum(allr) / len(allr)
        sd_all = math.sqrt(sum((x - mu_all) ** 2 for x in allr) / len(allr))
        for k in range(4):
            grp = allr[3 * k:3 * k + 3]
            mu = sum(grp) / 3
            sd = sd_all if global_std else math.sqrt(sum((x - mu) ** 2 for x in grp) / 3)
            for j in range(3):
                assert abs(float(got[3 * k + j]) - (grp[j] - mu) / (sd + 1e-4)) < 1e-9
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(r[:10], 3)


class Net(torch.nn.Module):
    """A small nonlinear denoiser that takes per-sample timesteps, like a UNet or transformer."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = SHAPE[1] * SHAPE[2] * SHAPE[3]
        self.w = torch.nn.Parameter(torch.randn(n, n, generator=g) * 0.2)
        self.b = torch.nn.Parameter(torch.randn(n, generator=g) * 0.2)

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1) if torch.is_tensor(t) else torch.tensor([[float(t)]])
        h = x.flatten(1) @ self.w + self.b * torch.cos(t / 400.0)
        return torch.tanh(h).reshape(x.shape)


def _ddim_mean_std(rule, out, x, i, eta):
    a = float(rule.alphas_cumprod[rule.timesteps[i]])
    a_prev = float(rule.alphas_cumprod[rule.timesteps[i + 1]]) if i + 1 < rule.num_steps else rule.final_alpha_cumprod
    eps = out
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    std = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std**2) * eps, std


def _flow_mean_std(rule, out, x, i, eta):
    s, s_next = float(rule.sigmas[i]), float(rule.sigmas[i + 1])
    g = eta * math.sqrt(s / (1 - (s if s < 1 else float(rule.sigmas[1]))))
    ds = s_next - s
    return x + ds * (out + g * g / (2 * s) * (x + (1 - s) * out)), g * math.sqrt(-ds)


def _hand_grpo_loss(policy, reference, rule, mean_std, rollout, adv, steps, cfg, eta):
    total, kl_total = 0.0, 0.0
    b = adv.shape[0]
    for k in range(b):  # one sample at a time, its own step
        i = int(steps[k])
        x, x_next = rollout.latents[k, i:i + 1], rollout.next_latents[k, i:i + 1]
        t = rule.timesteps[i]
        mu, std = mean_std(rule, policy(x, t), x, i, eta)
        logp = (-(x_next - mu) ** 2 / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)).mean()
        ratio = torch.exp(logp - rollout.log_probs[k, i])
        a = float(adv[k].clamp(-cfg.adv_clip_max, cfg.adv_clip_max))
        total = total + torch.maximum(-a * ratio, -a * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range))
        with torch.no_grad():
            mu_ref, _ = mean_std(rule, reference(x, t), x, i, eta)
        kl_total = kl_total + ((mu - mu_ref) ** 2).mean() / (2 * std**2)
    return total / b + cfg.kl_coeff * kl_total / b


@pytest.mark.parametrize("kind", ["ddim", "flow"])
def test_grpo_gradient_equals_hand_written_density(kind):
    torch.manual_seed(0)
    if kind == "ddim":
        sched = DDIMScheduler(**SD_SCHEDULE)
        rule, mean_std, eta = DDIMRule.from_diffusers(sched, 5), _ddim_mean_std, 1.0
    else:
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        rule, mean_std, eta = FlowMatchRule.from_diffusers(sched, 5), _flow_mean_std, 0.7
    policy, reference = Net(0).double(), Net(0).double()
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    rollout = ddpo_rollout(policy, rule, x_T, eta, generator=g)
    with torch.no_grad():  # the policy moved since the rollout: ratios != 1, so the clip engages for some
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    adv = torch.tensor([1.5, -0.7, 6.0, -2.0], dtype=torch.float64)  # one beyond adv_clip_max
    steps = torch.tensor([0, 3, 1, 4])
    cfg = GRPOConfig(clip_range=1e-2, adv_clip_max=5.0, kl_coeff=0.3)

    loss, metrics = grpo_step_loss(policy, reference, rule, rollout, adv, steps, cfg, eta)
    ours = torch.autograd.grad(loss, list(policy.parameters()))
    hand = _hand_grpo_loss(policy, reference, rule, mean_std, rollout, adv, steps, cfg, eta)
    want = torch.autograd.grad(hand, list(policy.parameters()))
    torch.testing.assert_close(loss, hand, rtol=1e-10, atol=1e-12)
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert 0.0 < float(metrics["clipfrac"]) < 1.0, "both branches of the clip are exercised"
    assert float(metrics["kl"]) > 0
    assert any(float(a.abs().max()) > 0 for a in ours)


def test_grpo_without_kl_needs_no_reference_and_refuses_deterministic_steps():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    rule = FlowMatchRule.from_diffusers(sched, 3)
    policy = Net(2).double()
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ro = ddpo_rollout(policy, rule, x_T, 0.7, generator=torch.Generator().manual_seed(1))
    adv, steps = torch.zeros(4, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    loss, metrics = grpo_step_loss(policy, None, rule, ro, adv, steps, GRPOConfig(kl_coeff=0.0), 0.7)
    assert "kl" not in metrics and float(loss) == 0.0
    with pytest.raises(ValueError, match="reference"):
        grpo_step_loss(policy, None, rule, ro, adv, steps, GRPOConfig(kl_coeff=0.1), 0.7)
    with pytest.raises(ValueError, match="eta > 0"):
        grpo_step_loss(policy, None, rule, ro, adv, steps, GRPOConfig(kl_coeff=0.0), 0.0)
