"""draft_objective input checks (the gradient tests live in test_sampler_grad.py; the ranges of the
DRaFT parameters are the config's, tests/config/test_schema.py)."""
import pytest
import torch

from nemo_aligner_draft.core.draft import DraftConfig, draft_objective


@pytest.mark.parametrize("lv_copies", [0, 2])
def test_kl_without_reference_is_an_error_not_a_silent_zero_penalty(make_backend, reward_fn, lv_copies):
    b = make_backend()
    rule = b.step_rule(2)
    cond = b.encode_prompts(["x", "y"])
    x = b.initial_latents(2, 64, 64, rule, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="needs a reference denoiser"):
        draft_objective(b.denoiser(cond, 3.0), None, rule, x, b.decode, reward_fn,
                        DraftConfig(kl_coeff=0.5, lv_copies=lv_copies))
