"""LoRA soup: endpoints, the ΔW-linear convention (default) and the both-factors convention
(ΔW ∝ α²) checked numerically, and the souped adapter loaded into a real peft model."""
import pytest
import torch

from nemo_aligner_draft.core.soup import lora_delta, lora_pairs, soup_deltas, soup_lora, soup_rank


def _adapter(seed, rank):
    g = torch.Generator().manual_seed(seed)
    return {
        "down.proj.lora_A.weight": torch.randn(rank, 6, generator=g),
        "down.proj.lora_B.weight": torch.randn(5, rank, generator=g),
        "conv.lora_A.weight": torch.randn(rank, 3, 3, 3, generator=g),
        "conv.lora_B.weight": torch.randn(4, rank, 1, 1, generator=g),
    }


def _delta(sd, module, scale=1.0):
    a, b = lora_pairs(sd)[module]
    return lora_delta(sd[a], sd[b], scale)


def _hand_delta(a, b):
    """B A written as explicit sums over the rank (conv: per kernel position)."""
    a, b = a.double(), b.double()
    if a.ndim == 2:
        return sum(torch.outer(b[:, k], a[k]) for k in range(a.shape[0]))
    return sum(b[:, k, 0, 0][:, None, None, None] * a[k][None] for k in range(a.shape[0]))


MODULES = ["down.proj.weight", "conv.weight"]


def test_lora_delta_matches_explicit_sum():
    sd = _adapter(0, 3)
    for m in MODULES:
        a, b = lora_pairs(sd)[m]
        torch.testing.assert_close(lora_delta(sd[a], sd[b], 0.5), 0.5 * _hand_delta(sd[a], sd[b]))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_delta_mode_is_linear_in_delta_w(alpha):
    first, second = _adapter(1, 2), _adapter(2, 3)  # different ranks are fine
    s1, s2 = 2.0, 0.5
    deltas = soup_deltas(first, second, alpha, "delta", s1, s2)
    for m in MODULES:
        expected = alpha * _delta(first, m, s1) + (1 - alpha) * _delta(second, m, s2)
        torch.testing.assert_close(deltas[m], expected)
    soup = soup_lora(first, second, alpha, "delta", s1, s2)
    assert soup_rank(soup) == {m: 5 for m in MODULES}
    if alpha == 1.0:  # endpoint: exactly the first adapter's ΔW
        for m in MODULES:
            torch.testing.assert_close(deltas[m], _delta(first, m, s1))


def test_one_adapter_against_base_both_conventions():
    first = _adapter(3, 4)
    for alpha in (0.0, 0.4, 1.0):
        lin = soup_deltas(first, None, alpha, "delta", 1.5)
        quad = soup_deltas(first, None, alpha, "factors", 1.5)
        for m in MODULES:
            torch.testing.assert_close(lin[m], alpha * _delta(first, m, 1.5))
            torch.testing.assert_close(quad[m], alpha**2 * _delta(first, m, 1.5))
    # delta mode keeps A untouched and the rank unchanged
    soup = soup_lora(first, None, 0.4)
    torch.testing.assert_close(soup["conv.lora_A.weight"], first["conv.lora_A.weight"], rtol=0, atol=0)
    assert soup_rank(soup) == soup_rank(first)


def test_factors_mode_two_adapters():
    first, second = _adapter(4, 2), _adapter(5, 2)
    alpha = 0.3
    deltas = soup_deltas(first, second, alpha, "factors")
    for m in MODULES:
        a1, b1 = (first[k] for k in lora_pairs(first)[m])
        a2, b2 = (second[k] for k in lora_pairs(second)[m])
        # expand (αB1 + (1−α)B2)(αA1 + (1−α)A2): the cross terms make it non-linear in ΔW
        expected = (alpha**2 * _hand_delta(a1, b1) + (1 - alpha) ** 2 * _hand_delta(a2, b2)
                    + alpha * (1 - alpha) * (_hand_delta(a2, b1) + _hand_delta(a1, b2)))
        torch.testing.assert_close(deltas[m], expected)
        linear = alpha * _hand_delta(a1, b1) + (1 - alpha) * _hand_delta(a2, b2)
        assert (deltas[m] - linear).abs().max() > 1e-3
    for alpha, ref in ((1.0, first), (0.0, second)):
        soup = soup_lora(first, second, alpha, "factors")
        for k in first:
            torch.testing.assert_close(soup[k], ref[k])


def test_errors_name_the_key():
    sd = _adapter(0, 2)
    with pytest.raises(ValueError, match="'down.proj.weight' has no lora_B"):
        soup_lora({"down.proj.lora_A.weight": sd["down.proj.lora_A.weight"]}, None, 0.5)
    with pytest.raises(ValueError, match="'unet.conv_in.weight' is not a LoRA factor"):
        soup_lora({**sd, "unet.conv_in.weight": torch.zeros(1)}, None, 0.5)
    with pytest.raises(ValueError, match="equal ranks"):
        soup_lora(sd, _adapter(1, 3), 0.5, "factors")
    with pytest.raises(ValueError, match="different modules"):
        soup_lora(sd, {k: v for k, v in sd.items() if k.startswith("conv")}, 0.5)
    with pytest.raises(ValueError, match="soup mode"):
        soup_lora(sd, None, 0.5, "average")


def test_souped_adapter_in_a_real_peft_model():
    """Load the rank-(r1+r2) soup into peft with lora_alpha = rank (scaling 1): the model's output
    equals W x + (α s1 ΔW1 + (1−α) s2 ΔW2) x."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    def make(rank, lora_alpha, seed):
        torch.manual_seed(0)
        base = torch.nn.Sequential(torch.nn.Linear(6, 5))
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=["0"]))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g))
        return model

    m1, m2 = make(2, 4, 1), make(3, 3, 2)  # scales s = lora_alpha / r = 2 and 1
    sd1, sd2 = get_peft_model_state_dict(m1), get_peft_model_state_dict(m2)
    alpha = 0.35
    soup = soup_lora(sd1, sd2, alpha, "delta", 2.0, 1.0)
    m = make(5, 5, 3)  # scaling 1
    set_peft_model_state_dict(m, soup)
    x = torch.randn(7, 6)
    with torch.no_grad():
        with m.disable_adapter():
            base_out = m(x).double()
        d1 = m1(x).double() - base_out
        d2 = m2(x).double() - base_out
        torch.testing.assert_close(m(x).double(), base_out + alpha * d1 + (1 - alpha) * d2, atol=1e-5, rtol=1e-5)
