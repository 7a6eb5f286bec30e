"""Loss formulas against the same formulas computed by hand, element by element."""
import pytest
import torch

from nemo_aligner_draft.core.losses import draftp_loss, eps_penalty, reward_to_loss


def _data(seed=0, steps=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(4, generator=g, dtype=dtype)
    eps = [torch.randn(4, 4, 3, 3, generator=g, dtype=dtype, requires_grad=True) for _ in range(steps)]
    eps_ref = [torch.randn(4, 4, 3, 3, generator=g, dtype=dtype) for _ in range(steps)]
    return rewards, eps, eps_ref


def _penalty_by_hand(eps, eps_ref):
    per_step = []
    for e, r in zip(eps, eps_ref):
        total, count = 0.0, 0
        for v in (e.detach() - r).flatten().tolist():
            total += v * v
            count += 1
        per_step.append(total / count)
    return sum(per_step) / len(per_step)


@pytest.mark.parametrize("kl", [0.0, 0.2, 1.0])
def test_draftp_loss_equals_hand_formula(kl):
    rewards, eps, eps_ref = _data()
    loss, metrics = draftp_loss(rewards, eps, eps_ref, kl)
    rs = rewards.tolist()
    mean_r = sum(rs) / len(rs)
    penalty = _penalty_by_hand(eps, eps_ref)
    assert loss.item() == pytest.approx(-mean_r + kl * penalty, rel=1e-12)
    assert metrics["reward_mean"].item() == pytest.approx(mean_r, rel=1e-12)
    assert metrics["reward_std"].item() == pytest.approx((sum((r - mean_r) ** 2 for r in rs) / len(rs)) ** 0.5,
                                                          rel=1e-12)
    assert metrics["kl_penalty"].item() == pytest.approx(penalty if kl else 0.0, rel=1e-12)
    assert not any(v.requires_grad for v in metrics.values())


def test_draftp_penalty_gradient_is_the_hand_derivative():
    rewards, eps, eps_ref = _data(seed=1)
    kl = 0.7
    loss, _ = draftp_loss(rewards, eps, eps_ref, kl)
    loss.backward()
    k = len(eps)
    for e, r in zip(eps, eps_ref):
        # d/dε_k of kl · (1/K) Σ_k mean (ε_k − ε_ref,k)² = 2·kl·(ε_k − ε_ref,k) / (K · numel)
        expected = 2 * kl * (e.detach() - r) / (k * e.numel())
        torch.testing.assert_close(e.grad, expected, rtol=1e-12, atol=1e-15)


def test_eps_penalty_mismatched_lengths_raise_and_empty_is_zero():
    _, eps, eps_ref = _data()
    with pytest.raises(ValueError, match="3 policy predictions but 2 reference"):
        eps_penalty(eps, eps_ref[:2])
    with pytest.raises(ValueError):
        draftp_loss(torch.zeros(4), eps, [], kl_coeff=0.5)
    assert eps_penalty([], []).item() == 0.0


def test_eps_penalty_single_step_is_mean_square():
    _, eps, eps_ref = _data(steps=1)
    assert eps_penalty(eps, eps_ref).item() == pytest.approx(_penalty_by_hand(eps, eps_ref), rel=1e-12)


def test_reward_to_loss_modes():
    r = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)
    assert reward_to_loss(r).item() == pytest.approx(-(0.5 - 1.0 + 2.0 + 0.25) / 4)
    assert reward_to_loss(r, "negate", coeff=3.0).item() == pytest.approx(-3.0 * 1.75 / 4)
    # target: coeff · mean |r − target|
    assert reward_to_loss(r, "target", target=1.0, coeff=2.0).item() == pytest.approx(
        2.0 * (0.5 + 2.0 + 1.0 + 0.75) / 4)
    with pytest.raises(ValueError, match="'negate' or 'target'"):
        reward_to_loss(r, "hinge")
