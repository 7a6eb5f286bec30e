"""SDPO core: returns against the closed-form discounted sum, the clipped reward-difference loss
and its gradient against hand computations, and the paired rollout / dense rewards on tiny SD."""
import pytest
import torch

from nemo_aligner_draft.backends import load_backend
from nemo_aligner_draft.core.sdpo import (
    SDPOConfig,
    dense_rewards,
    discounted_returns,
    sdpo_advantages,
    sdpo_loss,
    sdpo_paired_rollout,
    sdpo_step_loss,
    temporal_weights,
)
from nemo_aligner_draft.core.stat_tracking import PerPromptStatTracker

T = 3
PROMPTS = ["a cat", "a dog"]


def test_discounted_returns_closed_form():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 0.0, 2.0]], dtype=torch.float64)
    g = 0.9
    expected = torch.tensor([[sum(g ** (k - i) * float(r[b, k]) for k in range(i, 4)) for i in range(4)]
                             for b in range(2)], dtype=torch.float64)
    torch.testing.assert_close(discounted_returns(r, g), expected)
    torch.testing.assert_close(discounted_returns(r, 0.0), r)


def test_temporal_weights():
    torch.testing.assert_close(temporal_weights(4, 0.5, 2.0), torch.tensor([0.5, 0.25, 0.125, 0.0625],
                                                                             dtype=torch.float64))


def _toy(theta):
    """log π_θ = log π_old + θ·c for four pairs (c differs per sample and trajectory)."""
    o1 = torch.tensor([-1.0, -2.0, -0.5, -1.5])
    o2 = torch.tensor([-1.2, -1.0, -0.7, -0.9])
    c1 = torch.tensor([1.0, -2.0, 0.5, 3.0])
    c2 = torch.tensor([0.5, 1.0, -1.0, 1.0])
    return o1 + theta * c1, o1, o2 + theta * c2, o2, c1, c2


@pytest.mark.parametrize("theta_value", [0.0, 0.3])
def test_sdpo_loss_and_gradient_by_hand(theta_value):
    theta = torch.tensor(theta_value, requires_grad=True)
    n1, o1, n2, o2, c1, c2 = _toy(theta)
    adv1 = torch.tensor([1.0, -0.5, 9.0, 0.2])  # 9 is clipped to 5
    adv2 = torch.tensor([-1.0, 0.5, 0.0, 0.3])
    w = torch.tensor([1.0, 0.99, 0.98, 0.97])
    eps = 0.1
    loss, m = sdpo_loss(n1, o1, n2, o2, adv1, adv2, w, clip_range=eps, adv_clip_max=5.0)
    loss.backward()

    # hand computation, one pair at a time in plain floats
    th = theta_value
    total, grad = 0.0, 0.0
    for b in range(4):
        t = min(max(float(adv1[b]), -5), 5) - min(max(float(adv2[b]), -5), 5)
        d1, d2 = th * float(c1[b]), th * float(c2[b])
        lu = (float(w[b]) * (d1 - d2) - t) ** 2
        cd1, cd2 = min(max(d1, -eps), eps), min(max(d2, -eps), eps)
        lc = (float(w[b]) * (cd1 - cd2) - t) ** 2
        total += max(lu, lc) / 4
        if th == 0.0:  # both branches coincide and are differentiable
            grad += 2 * (float(w[b]) * (d1 - d2) - t) * float(w[b]) * (float(c1[b]) - float(c2[b])) / 4
        elif lu >= lc:
            grad += 2 * (float(w[b]) * (d1 - d2) - t) * float(w[b]) * (float(c1[b]) - float(c2[b])) / 4
        else:  # clipped branch: only unclamped log-probs carry gradient
            g1 = float(c1[b]) if abs(d1) < eps else 0.0
            g2 = float(c2[b]) if abs(d2) < eps else 0.0
            grad += 2 * (float(w[b]) * (cd1 - cd2) - t) * float(w[b]) * (g1 - g2) / 4
    assert abs(float(loss.detach()) - total) < 1e-5
    assert abs(float(theta.grad) - grad) < 1e-5
    if theta_value == 0.0:
        # identical old/new policies: the loss is the mean squared advantage difference
        assert abs(float(loss.detach()) - float(((adv1.clamp(-5, 5) - adv2) ** 2).mean())) < 1e-6
    else:
        assert float(m["clipfrac"]) > 0


def test_advantages_per_step_prompt():
    r1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    r2 = torch.tensor([[2.0, 2.0], [1.0, 8.0]])
    tr = PerPromptStatTracker(buffer_size=4, min_count=2)
    a1, a2 = sdpo_advantages(r1, r2, ["p", "q"], tr)
    # prompt p at step 0 has rewards {1, 2} (both trajectories): ±1 after normalisation
    assert abs(float(a1[0, 0]) + 1) < 1e-5 and abs(float(a2[0, 0]) - 1) < 1e-5
    # equal rewards give zero advantage (std 0 + 1e-6)
    assert float(a1[0, 1]) == 0.0 and float(a2[0, 1]) == 0.0
    assert abs(float(a2[1, 1]) - 1) < 1e-5


@pytest.fixture(scope="module")
def paired(tiny_sd_dir):
    backend = load_backend(tiny_sd_dir)
    rule = backend.step_rule(T)
    cond = backend.encode_prompts(PROMPTS)
    g = torch.Generator().manual_seed(0)
    lat = backend.initial_latents(2, 64, 64, rule, generator=g)
    first, second = sdpo_paired_rollout(backend.denoiser(cond, 2.0), rule, lat, 1.0, generator=g)
    return backend, rule, cond, first, second


def test_paired_rollout_and_dense_rewards(paired):
    backend, rule, cond, first, second = paired
    # same start, different eta-noise afterwards
    torch.testing.assert_close(first.latents[:, 0], second.latents[:, 0], rtol=0, atol=0)
    assert (first.next_latents[:, 0] - second.next_latents[:, 0]).abs().max() > 1e-3
    assert first.pred_x0_steps.shape == (2, T, 4, 8, 8)
    score = lambda img: img.mean(dim=(1, 2, 3))  # noqa: E731
    r = dense_rewards(first.pred_x0_steps, backend.decode, score)
    assert r.shape == (2, T)
    with torch.no_grad():
        # the dense reward at step i is the reward of that step's x̂0, recomputed from x_i directly
        i = 1
        eps = backend.denoiser(cond, 2.0)(first.latents[:, i], rule.timesteps[i])
        x0 = rule.split_output(eps, first.latents[:, i], i)[1]
        torch.testing.assert_close(r[:, i], score(backend.decode(x0)), atol=1e-5, rtol=1e-5)
    assert (r[:, 0] - r[:, -1]).abs().max() > 0  # steps differ


def test_step_loss_at_identical_params_and_gradient(paired):
    backend, rule, cond, first, second = paired
    params = [p for n, p in backend.unet.named_parameters() if "conv_out" in n]
    for p in params:
        p.requires_grad_(True)
    try:
        cfg = SDPOConfig(lam=0.9, clip_range=1e-4)
        adv1 = torch.tensor([[1.0, 0.5, -0.2], [0.3, -1.0, 2.0]])
        adv2 = torch.tensor([[-1.0, 0.1, 0.4], [0.0, 1.0, -2.0]])
        steps = torch.tensor([1, 1])
        den = backend.denoiser(cond, 2.0)
        loss, m = sdpo_step_loss(den, rule, first, second, adv1, adv2, steps, cfg, 1.0)  # the rollout eta
        target = adv1[:, 1] - adv2[:, 1]
        torch.testing.assert_close(loss.detach(), (target**2).mean(), atol=1e-4, rtol=1e-4)
        assert float(m["log_ratio_diff"]) < 1e-5
        grads = torch.autograd.grad(loss, params)
        # hand reference at π_θ = π_old: ∇L = mean_b −2·t_b·w_1·∇(log π¹ − log π²), the log-prob
        # written out as the DDIM Gaussian (constants dropped)
        ac = backend.scheduler.alphas_cumprod.float()
        a, a_prev = ac[int(rule.timesteps[1])], ac[int(rule.timesteps[2])]
        var = (1 - a_prev) / (1 - a) * (1 - a / a_prev)

        def logp(ro):
            x, x_next = ro.latents[:, 1], ro.next_latents[:, 1]
            eps = den(x, rule.timesteps[1])
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            mean = a_prev.sqrt() * x0 + (1 - a_prev - var).sqrt() * eps
            return (-(x_next - mean) ** 2 / (2 * var)).flatten(1).mean(1)

        ref = (-2 * target * 0.9 * (logp(first) - logp(second))).mean()
        ref_grads = torch.autograd.grad(ref, params)
        for g, r in zip(grads, ref_grads):
            assert r.abs().max() > 0
            torch.testing.assert_close(g, r, rtol=2e-3, atol=1e-7)
    finally:
        for p in params:
            p.requires_grad_(False)
