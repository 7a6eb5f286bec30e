"""DraftConfig / draft_objective input checks (the gradient tests live in test_sampler_grad.py)."""
import pytest
import torch

from nemo_aligner_draft.core.draft import DraftConfig, draft_objective


@pytest.mark.parametrize("kwargs,match", [
    (dict(decode_target="latents"), "decode_target"),
    (dict(kl_coeff=-0.1), "kl_coeff"),
    (dict(lv_copies=-1), "lv_copies"),
    (dict(truncation_steps=0), "truncation_steps"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DraftConfig(**kwargs)


def test_lv_ignores_truncation_steps():
    assert DraftConfig(lv_copies=2, truncation_steps=0).lv_copies == 2


@pytest.mark.parametrize("lv_copies", [0, 2])
def test_kl_without_reference_is_an_error_not_a_silent_zero_penalty(make_backend, reward_fn, lv_copies):
    b = make_backend()
    rule = b.step_rule(2)
    cond = b.encode_prompts(["x", "y"])
    x = b.initial_latents(2, 64, 64, rule, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="needs a reference denoiser"):
        draft_objective(b.denoiser(cond, 3.0), None, rule, x, b.decode, reward_fn,
                        DraftConfig(kl_coeff=0.5, lv_copies=lv_copies))
