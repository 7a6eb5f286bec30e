"""Registry: registered names, ``module:callable`` resolution, wrapping of plain callables."""
import pytest
import torch

from nemo_aligner_draft.rewards import REWARDS, Reward, build_reward, check_reward_output, register_reward


class MeanBrightness(Reward):
    """A user's reward defined outside the package: mean pixel value times ``gain``."""

    def __init__(self, gain=1.0):
        super().__init__()
        self.gain = gain

    def forward(self, images, prompts):
        return self.gain * images.mean(dim=(1, 2, 3))


def make_brightness(gain=1.0):
    return MeanBrightness(gain)


def make_plain_callable(offset=0.0):
    def fn(images, prompts):
        return images.flatten(1).amax(dim=1) + offset

    return fn


def test_module_callable_returning_reward():
    reward = build_reward(f"{__name__}:make_brightness", gain=3.0)
    assert isinstance(reward, MeanBrightness) and reward.name == f"{__name__}:make_brightness"
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(reward(x, ["a", "b"]), 3.0 * x.mean(dim=(1, 2, 3)))


def test_module_callable_plain_function_is_wrapped():
    reward = build_reward(f"{__name__}:make_plain_callable", offset=1.0)
    assert isinstance(reward, Reward) and reward.differentiable
    x = torch.rand(2, 3, 8, 8)
    total, parts = reward.score_with_parts(x, ["a", "b"])
    torch.testing.assert_close(total, x.flatten(1).amax(dim=1) + 1.0)
    assert list(parts) == [f"{__name__}:make_plain_callable"]


def test_register_reward_and_duplicates():
    name = "test_registry_brightness"
    try:
        register_reward(name)(make_brightness)
        assert isinstance(build_reward(name, gain=2.0), MeanBrightness)
        with pytest.raises(ValueError, match="already registered"):
            register_reward(name)(make_brightness)
    finally:
        REWARDS.pop(name, None)


def test_unknown_names_give_clear_errors():
    with pytest.raises(ValueError, match="unknown reward 'no_such_reward'.*registered"):
        build_reward("no_such_reward")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        build_reward("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        build_reward(f"{__name__}:missing")
    with pytest.raises(TypeError, match="not a callable"):
        build_reward(f"{__name__}:NOT_CALLABLE_FACTORY")


def NOT_CALLABLE_FACTORY():
    return 42


def test_check_reward_output():
    from nemo_aligner_draft.errors import InputError

    check_reward_output(torch.zeros(3), 3, "r")
    with pytest.raises(InputError, match=r"shape \(3, 1\)") as e:
        check_reward_output(torch.zeros(3, 1), 3, "r")
    assert e.value.key == "rm.name"
    with pytest.raises(InputError, match="floating"):
        check_reward_output(torch.zeros(3, dtype=torch.long), 3, "r")
