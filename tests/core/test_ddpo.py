"""DDPO core: stored log-probs against a hand-written Gaussian density, PPO-clip against the plain
policy gradient, advantage clipping, timestep selection."""
import math

import pytest
import torch

from nemo_aligner_draft.backends import load_backend
from nemo_aligner_draft.core.ddpo import (
    DDPOConfig,
    ddpo_log_prob,
    ddpo_rollout,
    ddpo_step_loss,
    iter_train_minibatches,
    ppo_clip_loss,
    select_timesteps,
)
from nemo_aligner_draft.core.schedulers import EulerRule

PROMPTS = ["a red cube", "a blue ball", "a red cube"]
ETA = 1.0
T = 4


@pytest.fixture(scope="module")
def backend(tiny_sd_dir):
    return load_backend(tiny_sd_dir)


@pytest.fixture(scope="module")
def rollout(backend):
    rule = backend.step_rule(T)
    cond = backend.encode_prompts(PROMPTS)
    g = torch.Generator().manual_seed(0)
    lat = backend.initial_latents(len(PROMPTS), 64, 64, rule, generator=g)
    out = ddpo_rollout(backend.denoiser(cond, 3.0), rule, lat, ETA, generator=g)
    return rule, cond, out


def _hand_log_density(backend, cond, rule, x, x_next, i, guidance):
    """log N(x_next; μ, σ²) averaged over dims, DDIM eq. 12/16 written out in float64."""
    ac = backend.scheduler.alphas_cumprod.double()
    t = int(rule.timesteps[i])
    a = ac[t]
    a_prev = ac[int(rule.timesteps[i + 1])] if i + 1 < T else ac[0]  # set_alpha_to_one=False
    with torch.no_grad():
        eps = backend.denoiser(cond, guidance)(x, rule.timesteps[i]).double()
    x, x_next = x.double(), x_next.double()
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    var = ETA**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    mean = a_prev.sqrt() * x0 + (1 - a_prev - var).sqrt() * eps
    d = x_next - mean
    logp = -d**2 / (2 * var) - 0.5 * torch.log(var) - 0.5 * math.log(2 * math.pi)
    return logp.flatten(1).mean(1)


def test_stored_log_probs_match_gaussian_density(backend, rollout):
    rule, cond, out = rollout
    assert out.latents.shape == (3, T, 4, 8, 8) and out.log_probs.shape == (3, T)
    # the chain is consistent: x_{i+1} stored as next of step i is x of step i+1
    torch.testing.assert_close(out.next_latents[:, :-1], out.latents[:, 1:])
    for i in range(T):
        ref = _hand_log_density(backend, cond, rule, out.latents[:, i], out.next_latents[:, i], i, 3.0)
        torch.testing.assert_close(out.log_probs[:, i].double(), ref, atol=2e-4, rtol=1e-5)
        # the recomputation used for training agrees with the stored value
        with torch.no_grad():
            lp = ddpo_log_prob(backend.denoiser(cond, 3.0), rule, out.latents[:, i], out.next_latents[:, i], i, ETA)
        torch.testing.assert_close(lp, out.log_probs[:, i], atol=1e-5, rtol=0)


def test_per_sample_steps_match_per_step_calls(backend, rollout):
    """Mixed step indices in one call (UNet sees a [B] timestep tensor) equal separate calls."""
    rule, cond, out = rollout
    steps = torch.tensor([0, 2, 3])
    den = backend.denoiser(cond, 1.0)  # no CFG: the plain UNet accepts per-sample timesteps
    rows = torch.arange(3)
    with torch.no_grad():
        mixed = ddpo_log_prob(den, rule, out.latents[rows, steps], out.next_latents[rows, steps], steps, ETA)
        for b in range(3):
            single_cond = backend.encode_prompts([PROMPTS[b]])
            one = ddpo_log_prob(backend.denoiser(single_cond, 1.0), rule, out.latents[b:b + 1, steps[b]],
                                out.next_latents[b:b + 1, steps[b]], int(steps[b]), ETA)
            torch.testing.assert_close(mixed[b:b + 1], one, atol=1e-5, rtol=0)


def test_first_inner_step_ratio_one_and_policy_gradient(backend, rollout):
    """Params unchanged since sampling: ρ = 1 and ∇L = −mean(A ∇log π) computed independently."""
    rule, cond, out = rollout
    unet = backend.unet
    params = [p for n, p in unet.named_parameters() if "conv_out" in n or "attn2.to_v" in n]
    for p in params:
        p.requires_grad_(True)
    try:
        adv = torch.tensor([1.5, -0.7, 8.0])  # the last one is clipped to adv_clip_max
        cfg = DDPOConfig(clip_range=1e-4, adv_clip_max=5.0)
        steps = torch.tensor([1, 1, 1])
        den = backend.denoiser(cond, 3.0)
        loss, metrics = ddpo_step_loss(den, rule, out, adv, steps, cfg, ETA)
        assert abs(float(metrics["ratio_mean"]) - 1.0) < 1e-5
        assert float(metrics["approx_kl"]) < 1e-10 and float(metrics["clipfrac"]) == 0.0
        # at ρ = 1 the loss value is −mean(A_clipped)
        torch.testing.assert_close(loss.detach(), -adv.clamp(-5, 5).mean(), atol=1e-5, rtol=0)
        grads = torch.autograd.grad(loss, params)

        # reference: plain REINFORCE on the hand-written Gaussian log-density, with grad
        i = 1
        ac = backend.scheduler.alphas_cumprod.float()
        a, a_prev = ac[int(rule.timesteps[i])], ac[int(rule.timesteps[i + 1])]
        x, x_next = out.latents[:, i], out.next_latents[:, i]
        eps = den(x, rule.timesteps[i])
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        var = ETA**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        mean = a_prev.sqrt() * x0 + (1 - a_prev - var).sqrt() * eps
        logp = (-(x_next - mean) ** 2 / (2 * var)).flatten(1).mean(1)  # constants carry no gradient
        ref_loss = -(adv.clamp(-5, 5) * logp).mean()
        ref_grads = torch.autograd.grad(ref_loss, params)
        for g, r in zip(grads, ref_grads):
            assert r.abs().max() > 0
            torch.testing.assert_close(g, r, rtol=2e-3, atol=1e-7)
    finally:
        for p in params:
            p.requires_grad_(False)


def test_ppo_clip_loss_formula_and_advantage_clipping():
    old = torch.tensor([0.0, 0.0, 0.0, 0.0])
    new = torch.tensor([0.5, -0.5, 0.5, -0.5], requires_grad=True)
    adv = torch.tensor([2.0, 2.0, -30.0, -1.0])
    loss, m = ppo_clip_loss(new, old, adv, clip_range=0.2, adv_clip_max=5.0)
    r = torch.exp(new.detach())
    a = torch.tensor([2.0, 2.0, -5.0, -1.0])
    # elementwise max of the two surrogates, written per case:
    # A>0, ρ>1+ε → clipped (1.2); A>0, ρ<1−ε → unclipped; A<0, ρ>1+ε → unclipped; A<0, ρ<1−ε → clipped (0.8)
    expected = torch.stack([-a[0] * 1.2, -a[1] * r[1], -a[2] * r[2], -a[3] * 0.8]).mean()
    torch.testing.assert_close(loss, expected)
    assert float(m["clipfrac"]) == 1.0 and float(m["adv_clipfrac"]) == 0.25
    loss.backward()
    # clipped entries carry no gradient; unclipped ones −A ρ / B
    expected_grad = torch.tensor([0.0, -a[1] * r[1] / 4, -a[2] * r[2] / 4, 0.0])
    torch.testing.assert_close(new.grad, expected_grad)
    # an advantage beyond the bound acts exactly like the bound
    l_big, _ = ppo_clip_loss(new.detach(), old, torch.tensor([100.0, 1, 1, 1]), 0.2, 5.0)
    l_cap, _ = ppo_clip_loss(new.detach(), old, torch.tensor([5.0, 1, 1, 1]), 0.2, 5.0)
    torch.testing.assert_close(l_big, l_cap)
    l_unc, _ = ppo_clip_loss(new.detach(), old, torch.tensor([100.0, 1, 1, 1]), 0.2, 1000.0)
    assert float(l_unc) < float(l_big) - 1


def test_select_timesteps_subsets():
    g = torch.Generator().manual_seed(1)
    s = select_timesteps(10, 0.5, 64, g)
    assert s.shape == (64, 5)
    for row in s:
        assert len(set(row.tolist())) == 5 and row.min() >= 0 and row.max() < 10
    # different samples get different subsets, and every step gets picked somewhere
    assert len({tuple(sorted(r.tolist())) for r in s}) > 10
    assert set(s.flatten().tolist()) == set(range(10))
    assert select_timesteps(10, 0.01, 2, g).shape == (2, 1)  # (its range is DDPOConfig's: tests/config)


def test_iter_train_minibatches_covers_every_sample_once():
    g = torch.Generator().manual_seed(0)
    batches = list(iter_train_minibatches(12, 4, 6, 0.5, g))
    assert len(batches) == 3
    assert sorted(torch.cat([b.indices for b in batches]).tolist()) == list(range(12))
    assert all(b.steps.shape == (4, 3) for b in batches)
    shared = list(iter_train_minibatches(12, 4, 6, 0.5, g, shared_timesteps=True))
    assert all((b.steps == b.steps[0]).all() for b in shared)
    with pytest.raises(ValueError, match="multiple of train_batch_size"):
        list(iter_train_minibatches(10, 4, 6, 1.0, g))


def test_rollout_rejects_deterministic_samplers(backend):
    rule = backend.step_rule(T)
    with pytest.raises(ValueError, match="eta > 0"):
        ddpo_rollout(lambda x, t: x, rule, torch.zeros(1, 4, 8, 8), eta=0.0)
    euler = EulerRule(torch.tensor([2.0, 1.0, 0.0]), torch.tensor([999, 500]))
    with pytest.raises(ValueError, match="eta > 0"):
        ddpo_rollout(lambda x, t: x, euler, torch.zeros(1, 4, 8, 8), eta=1.0)


def test_a_deterministic_last_ddim_step_is_left_out_of_the_rollout(backend):
    """A DDIM schedule ending on ᾱ = 1 (set_alpha_to_one true: DDIMScheduler's default, which a scheduler
    config without the key converts to, as the tiny SDXL's Euler config does) has no noise in its last step
    at any eta: the rollout keeps the T − 1 stochastic steps, each stored x_i / x_{i+1} / log-prob still the
    hand-written density's, and the final sample is the last step's output."""
    from diffusers import DDIMScheduler

    from nemo_aligner_draft.core.schedulers import DDIMRule

    sched = DDIMScheduler.from_config(backend.scheduler.config, set_alpha_to_one=True)
    rule = DDIMRule.from_diffusers(sched, T)
    assert rule.final_alpha_cumprod == 1.0
    cond = backend.encode_prompts(PROMPTS)
    g = torch.Generator().manual_seed(0)
    lat = backend.initial_latents(len(PROMPTS), 64, 64, rule, generator=g)
    out = ddpo_rollout(backend.denoiser(cond, 3.0), rule, lat, ETA, generator=g)
    assert out.num_steps == T - 1 and out.latents.shape[1] == out.next_latents.shape[1] == T - 1
    torch.testing.assert_close(out.timesteps, rule.timesteps[:T - 1])
    torch.testing.assert_close(out.next_latents[:, :-1], out.latents[:, 1:])
    for i in range(T - 1):  # steps before the last have a_prev < 1: the density of the test above
        ref = _hand_log_density(backend, cond, rule, out.latents[:, i], out.next_latents[:, i], i, 3.0)
        torch.testing.assert_close(out.log_probs[:, i].double(), ref, atol=2e-4, rtol=1e-5)
    with torch.no_grad():  # the deterministic last step: x0 = (x − √(1−ᾱ) ε) / √ᾱ, landing on ᾱ = 1
        x = out.next_latents[:, -1]
        a = float(rule.alphas_cumprod[int(rule.timesteps[-1])])
        eps = backend.denoiser(cond, 3.0)(x, rule.timesteps[-1])
        torch.testing.assert_close(out.final, (x - math.sqrt(1 - a) * eps) / math.sqrt(a), atol=1e-5, rtol=1e-5)
    # training on it: every step index the minibatches draw has its stored tensors
    cfg = DDPOConfig(train_micro_batch_size=3)
    for mb in iter_train_minibatches(3, 3, out.num_steps, 1.0, torch.Generator().manual_seed(1)):
        loss, _ = ddpo_step_loss(backend.denoiser(cond, 3.0), rule, out.select(mb.indices), torch.ones(3),
                                 mb.steps[:, 0], cfg, ETA)
        assert torch.isfinite(loss)


def test_sampler_refuses_a_stochastic_step_after_a_deterministic_one():
    from nemo_aligner_draft.core.sampler import StepPlan, sample
    from nemo_aligner_draft.core.schedulers import DDIMRule

    # ᾱ = 1 at the middle timestep: step 0 lands on it (no noise), step 1 leaves it with noise again
    alphas = torch.linspace(0.999, 0.5, 10)
    alphas[5] = 1.0
    rule = DDIMRule(alphas, torch.tensor([9, 5, 2]), 0.9, "epsilon")
    with pytest.raises(ValueError, match="stochastic after the deterministic step 0"):
        sample(lambda x, t: torch.zeros_like(x), rule, torch.ones(1, 4, 2, 2), StepPlan.no_grad(3), eta=1.0,
               generator=torch.Generator().manual_seed(0))
