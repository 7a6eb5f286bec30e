"""The shapes benchmark's rewards and prompt sets (``nemo_aligner_draft/embedded/benchmark.py``).

The differentiable reward is checked against a slow, obvious reference: finite differences of the
score on single pixels (the template is a reading of the image and stays put for a small step), and
the closed form −1000 · 2 (x − template) / (H · W) of its gradient. The claims the benchmark rests on
are checked on the domain's own renders: they score near the ceiling (0) on both rewards, and drawing
the wrong shape, shrinking the object or erasing it scores lower.
"""
import numpy as np
import pytest
import torch

from nemo_aligner_draft.data.prompts import load_prompts
from nemo_aligner_draft.embedded import benchmark, data
from nemo_aligner_draft.rewards import build_reward


@pytest.fixture(scope="module")
def renders():
    return benchmark.single_object_renders(60, seed=3)


@pytest.fixture(scope="module")
def shape_reward():
    return build_reward("embedded_shape")


def _render(shape, colour="red", background="white", cx=32.0, cy=32.0, half=10.0):
    scene = data.Scene(colour, shape, background, 1, None, ((cx, cy),), half)
    return data.to_tensor(data.render(scene)[None]), [data.caption_for(colour, shape, background)]


def test_renders_score_near_the_ceiling_on_both_rewards(renders, shape_reward):
    images, prompts = renders
    soft = shape_reward(images, prompts)
    hard = build_reward("embedded_shape_checker")(images, prompts)
    assert soft.shape == hard.shape == (60,)
    # pixel rounding of the bounding box costs a few points at most (measured: mean -2.2 on 120 renders)
    assert soft.mean() > -4 and soft.min() > -20, soft
    assert hard.mean() > -3 and hard.min() > -10, hard


def test_wrong_shape_small_or_missing_object_score_lower(shape_reward):
    square, prompt = _render("square")
    circle, _ = _render("circle")  # a circle where a square is asked for
    small, _ = _render("square", half=4.0)
    empty = data.to_tensor(np.full((1, 64, 64, 3), data.PALETTE["white"], np.uint8))
    scores = {k: float(shape_reward(x, prompt)) for k, x in
              (("square", square), ("circle", circle), ("small", small), ("empty", empty))}
    assert scores["square"] > -1.0
    assert scores["circle"] < scores["square"] - 5, scores
    assert scores["small"] < scores["square"] - 20, scores
    assert scores["empty"] < scores["square"] - 50, scores
    checker = build_reward("embedded_shape_checker")
    # fill ratio of a circle (pi/4) read against a square's (1): about -21.5
    assert float(checker(circle, prompt)) == pytest.approx(-100 * (1 - np.pi / 4), abs=3)
    assert float(checker(empty, prompt)) == -100.0


def test_gradient_matches_finite_differences_and_the_closed_form(shape_reward):
    torch.manual_seed(0)
    image, prompt = _render("triangle", colour="blue", background="yellow")
    x = (image + 0.05 * torch.randn_like(image)).clamp(0.02, 0.98).double().requires_grad_(True)
    r = shape_reward(x, prompt)
    (g,) = torch.autograd.grad(r.sum(), x)
    template = benchmark.template(x.detach()[0].float(), prompt[0]).double()
    closed = -1000.0 * 2 * (x.detach()[0] - template) / (64 * 64)
    assert torch.allclose(g[0], closed, atol=1e-9)
    eps = 1e-4
    for c, i, j in ((0, 32, 32), (1, 20, 41), (2, 5, 60), (0, 40, 28)):
        xp, xm = x.detach().clone(), x.detach().clone()
        xp[0, c, i, j] += eps
        xm[0, c, i, j] -= eps
        fd = (shape_reward(xp, prompt) - shape_reward(xm, prompt)).item() / (2 * eps)
        assert fd == pytest.approx(g[0, c, i, j].item(), rel=1e-4, abs=1e-9)
    assert g.abs().sum() > 0


def test_the_checker_reward_is_marked_non_differentiable():
    assert build_reward("embedded_shape").differentiable
    assert not build_reward("embedded_shape_checker").differentiable


def test_a_prompt_outside_the_domain_is_refused_by_name(shape_reward):
    image, _ = _render("circle")
    with pytest.raises(ValueError, match="embedded_shape: prompt 'a photo of a cat'"):
        shape_reward(image, ["a photo of a cat"])
    # the start-up probe scores with the reward's own probe prompt
    assert data.parse_caption(shape_reward.probe_prompt)


def test_prompt_sets():
    train = load_prompts("builtin:embedded_shapes_train")
    evaluation = load_prompts("builtin:embedded_shapes_eval")
    heldout = load_prompts("builtin:embedded_shapes_heldout")
    assert len(evaluation) == len(set(evaluation)) == 18
    assert train == evaluation * benchmark.REPEATS
    parsed = [data.parse_caption(p) for p in evaluation]
    assert {(p["color"], p["shape"]) for p in parsed} == {(c, s) for c in data.SHAPE_COLORS for s in data.SHAPES}
    assert all(p["count"] == 1 and p["position"] is None for p in parsed)
    assert all((p["color"], p["shape"], p["background"]) not in data.HELD_OUT_TRIPLES for p in parsed)
    assert len(heldout) == 80 and all(data.parse_caption(p)["count"] == 1 for p in heldout)
    assert all((q["color"], q["shape"], q["background"]) in data.HELD_OUT_TRIPLES
               for q in map(data.parse_caption, heldout))
