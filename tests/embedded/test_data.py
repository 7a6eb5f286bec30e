"""The procedural shapes data set: determinism, the held-out split, the caption grammar, the renderer's
geometry (against the closed-form areas of the shapes)."""
import math

import numpy as np
import pytest

from nemo_aligner_draft.embedded import data as shapes


def test_same_seed_same_data_other_seed_other_data():
    a_img, a_cap = shapes.make_dataset(50, seed=3)
    b_img, b_cap = shapes.make_dataset(50, seed=3)
    c_img, c_cap = shapes.make_dataset(50, seed=4)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    assert not np.array_equal(a_img, c_img) and a_cap != c_cap


def test_heldout_triples_never_drawn_in_train():
    _, caps = shapes.make_dataset(3000, seed=0, split="train")
    seen = {(p["color"], p["shape"], p["background"]) for p in map(shapes.parse_caption, caps)}
    assert not seen & shapes.HELD_OUT_TRIPLES
    # and every pair inside a held-out triple is still trained on (composition of seen attributes)
    for c, s, b in shapes.HELD_OUT_TRIPLES:
        assert any(t[0] == c and t[1] == s for t in seen)
        assert any(t[0] == c and t[2] == b for t in seen)
        assert any(t[1] == s and t[2] == b for t in seen)
    _, held = shapes.make_dataset(200, seed=0, split="heldout")
    assert {(p["color"], p["shape"], p["background"]) for p in map(shapes.parse_caption, held)} <= shapes.HELD_OUT_TRIPLES


def test_prompt_lists_disjoint_and_files(tmp_path):
    train, held = shapes.prompts("train"), shapes.prompts("heldout")
    assert not set(train) & set(held)
    assert len(held) == 12 * len(shapes.HELD_OUT_TRIPLES)  # 3 counts + 9 positions per triple
    train_path, held_path = shapes.write_prompt_files(str(tmp_path))
    assert open(train_path).read().splitlines() == train
    assert open(held_path).read().splitlines() == held


def test_caption_round_trip_and_rejects_other_text():
    for p in shapes.prompts("all"):
        assert shapes.caption_for(**shapes.parse_caption(p)) == p
    for bad in ["a red hexagon on a blue background", "a cat", "four red circles on a blue background",
                "a red circle on a pink background", "a red circle somewhere on a blue background"]:
        with pytest.raises(ValueError):
            shapes.parse_caption(bad)


@pytest.mark.parametrize("shape,area", [("circle", math.pi * 12 ** 2), ("square", 24 ** 2), ("triangle", 0.5 * 24 ** 2)])
def test_rendered_area_matches_geometry(shape, area):
    mask = shapes.shape_mask(shape, 32.0, 32.0, 12.0)
    assert abs(mask.sum() - area) / area < 0.05


def test_render_uses_palette_colours_only():
    img, caps = shapes.make_dataset(20, seed=1)
    colours = {tuple(v) for v in img.reshape(-1, 3)}
    for im, cap in zip(img, caps):
        p = shapes.parse_caption(cap)
        assert {tuple(v) for v in im.reshape(-1, 3)} == {shapes.PALETTE[p["color"]], shapes.PALETTE[p["background"]]}
    assert colours <= set(shapes.PALETTE.values())
