"""The analytic checker against ground truth: renders carry their true attributes, so on rendered
images it must read them all, and a caption with one attribute changed must fail on exactly that one."""
import random

from nemo_aligner_draft.embedded import checker, data as shapes


def _data(n=120, seed=7):
    img, caps = shapes.make_dataset(n, seed=seed, split="all")
    return list(img), caps


def test_reads_true_attributes_of_renders():
    img, caps = _data()
    acc = checker.accuracy(img, caps)
    assert acc == {"color": 1.0, "shape": 1.0, "background": 1.0, "count": 1.0, "all": 1.0}


def test_fill_ratio_near_theory():
    for shape, expected in [("circle", 0.785), ("square", 1.0), ("triangle", 0.5)]:
        scene = shapes.Scene("red", shape, "white", 1, None, ((32.0, 32.0),), 11.0)
        got = checker.read_attributes(shapes.render(scene))
        assert abs(got.fill_ratios[0] - expected) < 0.06, (shape, got.fill_ratios)


def test_changed_attribute_is_caught():
    img, caps = _data(60, seed=8)
    rng = random.Random(0)
    for key, choices in [("color", shapes.SHAPE_COLORS), ("shape", shapes.SHAPES), ("background", shapes.BACKGROUNDS)]:
        for im, cap in zip(img, caps):
            p = shapes.parse_caption(cap)
            other = [c for c in choices if c != p[key] and c not in (p["color"], p["background"])]
            p[key] = rng.choice(other)
            result = checker.check(im, shapes.caption_for(**p))
            assert not result[key]
            assert all(v for k, v in result.items() if k != key)


def test_float_tensor_input_matches_uint8():
    img, caps = _data(10, seed=9)
    tensors = shapes.to_tensor(__import__("numpy").stack(img))
    assert checker.accuracy(list(tensors), caps)["all"] == 1.0
