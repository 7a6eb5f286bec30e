"""The demo figures say what they show: every prompt, every reward, the row names and the headline
numbers are drawn; the grid a run saved is sliced back into the images it was made of; and the
demo's figure step works on a run directory alone, without training."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from nemo_aligner_draft.metrics import figures
from nemo_aligner_draft.metrics.figures import (GAIN_COLOUR, LOSS_COLOUR, drawn_texts, labelled_comparison,
                                                method_name, reward_curve, split_grid)
from nemo_aligner_draft.models.callbacks import image_grid, save_png

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "mm", "stable_diffusion", "demo.py")


def _images(n, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def _case(n):
    """Prompts that share no substring with one another's labels, rewards whose changes are +, − and 0."""
    prompts = [f"a {'red' if i % 2 else 'blue'} shape number {i:03d}" for i in range(n)]
    rewards_base = [10 + i + 0.25 for i in range(n)]
    rewards_tuned = [b + (0.5, -0.5, 0.0)[i % 3] for i, b in enumerate(rewards_base)]
    return prompts, rewards_base, rewards_tuned


def _text_artists(fig):
    from matplotlib.text import Text

    return [t for t in fig.findobj(Text) if t.get_text()]


def test_every_prompt_reward_change_and_row_name_is_drawn(tmp_path):
    n = 20  # cols=8: bands of 8, 8 and 4 images, so the padded last band is covered
    prompts, rb, rt = _case(n)
    path = str(tmp_path / "cmp.png")
    fig = labelled_comparison(_images(n), _images(n, seed=1), prompts, rb, rt, path, "the title",
                              row_names=("base", "DRaFT+ fine-tuned"), cols=8, subtitle="how to read it")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 8 * 16 and im.size[1] > 3 * 2 * 16
    assert not [f for f in os.listdir(tmp_path) if "tmp" in f]  # the atomic write left nothing behind
    texts = drawn_texts(fig)
    assert "the title" in texts and "how to read it" in texts
    assert texts.count("base") == 3 and texts.count("DRaFT+ fine-tuned") == 3  # named in every band
    for i, p in enumerate(prompts):
        assert f"{i + 1}. {p}" in texts, p
        assert str(i + 1) in texts  # the column number the label refers to
    # each reward is its own text item, so equality (not a substring of some other text) is required
    for i in range(n):
        assert texts.count(f"{rb[i]:.2f}") >= 1 and f"{rt[i]:.2f}" in texts, i
    colours = {}
    for t in _text_artists(fig):
        colours.setdefault(t.get_text(), set()).add(t.get_color())
    assert colours["+0.50"] == {GAIN_COLOUR} and colours["\u22120.50"] == {LOSS_COLOUR}
    assert "\u00b10.00" in colours
    assert texts.count("+0.50") + texts.count("\u22120.50") + texts.count("\u00b10.00") == n


def test_a_missing_prompt_or_reward_would_be_noticed():
    """The checks above are not vacuous: what was not passed in is not found among the drawn texts."""
    prompts, rb, rt = _case(4)
    fig = labelled_comparison(_images(4), _images(4), prompts[:3] + ["something else"], rb, rt, None, "t")
    texts = drawn_texts(fig)
    assert f"4. {prompts[3]}" not in texts and "4. something else" in texts
    assert f"{rb[0] + 100:.2f}" not in texts
    with pytest.raises(ValueError, match="same non-zero number"):
        labelled_comparison(_images(4), _images(3), prompts, rb, rt, None, "t")


def test_long_prompts_get_fewer_columns_then_an_ellipsis():
    prompts = ["short", "x" * 120, "y" * 2000]
    fig = labelled_comparison(_images(3), _images(3), prompts, [1, 2, 3], [1, 2, 3], None, "t", cols=16)
    texts = drawn_texts(fig)
    assert "1. short" in texts and f"2. {'x' * 120}" in texts  # one column is wide enough for 120 chars
    (long_label,) = [t for t in texts if t.startswith("3. y")]
    assert long_label.endswith("\u2026") and len(long_label) < 2000


def test_split_grid_returns_the_images_image_grid_saved(tmp_path):
    n = 20
    base, tuned = _images(n, size=8), _images(n, size=8, seed=3)
    save_png(image_grid([base, tuned], cols=16), str(tmp_path / "grid.png"))
    with Image.open(tmp_path / "grid.png") as im:
        rows = split_grid(im.convert("RGB"), n, n_rows=2, cols=16)
    for row, src in zip(rows, (base, tuned)):
        assert len(row) == n
        for got, want in zip(row, src):
            assert np.array_equal(got, (want.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    with pytest.raises(ValueError, match="does not split"):
        split_grid(np.zeros((50, 128, 3), np.uint8), n, n_rows=2, cols=16)


def test_reward_curve_names_axes_series_and_gain(tmp_path):
    train = [{"step": s, "reward_mean": 1.0 + 0.1 * s} for s in range(1, 11)]
    val = [{"step": 5, "reward_base": 1.0, "reward_tuned": 1.2, "gain_standard_error": 0.05, "prompts": ["p"] * 7},
           {"step": 10, "reward_base": 1.0, "reward_tuned": 1.5, "gain_standard_error": 0.1, "prompts": ["p"] * 7}]
    fig = reward_curve(train, val, str(tmp_path / "curve.png"), "my_reward", method="DRaFT+")
    assert (tmp_path / "curve.png").is_file()
    ax = fig.axes[0]
    assert "my_reward" in ax.get_ylabel() and ax.get_xlabel() == "optimizer step"
    legend = " | ".join(t.get_text() for t in fig.legends[0].get_texts())
    assert "training" in legend and "validation, DRaFT+" in legend and "validation, base model" in legend
    assert "7 held-out prompts" in legend
    assert any("+0.50 \u00b1 0.10" in t for t in drawn_texts(fig))


def test_method_name_follows_the_config():
    assert method_name({"algorithm": "draftp", "kl_coeff": 0.2, "lv_copies": 0}) == "DRaFT+"
    assert method_name({"algorithm": "draftp", "kl_coeff": 0.0}) == "DRaFT"
    assert method_name({"algorithm": "draftp", "kl_coeff": 0.0, "lv_copies": 2}) == "DRaFT-LV"
    assert method_name({"algorithm": "alignprop"}) == "AlignProp"


def _fake_run(run_dir, n=20, size=8):
    """What a finished run leaves behind: two validations, the later one is the one to show."""
    os.makedirs(os.path.join(run_dir, "images"))
    val = []
    grids = {}
    for k, step in enumerate((10, 20)):
        prompts, rb, rt = _case(n)
        rt = [r + k for r in rt]
        diff = torch.tensor(rt, dtype=torch.float64) - torch.tensor(rb, dtype=torch.float64)
        val.append({"step": step, "reward_base": sum(rb) / n, "reward_tuned": sum(rt) / n, "rewards_base": rb,
                    "rewards_tuned": rt, "prompts": prompts,
                    "gain_standard_error": float(diff.std() / n ** 0.5), "images_improved": int((diff > 0).sum())})
        grids[step] = (_images(n, size, seed=10 * k), _images(n, size, seed=10 * k + 1))
        save_png(image_grid(list(grids[step])), os.path.join(run_dir, "images", f"val_step{step:06d}.png"))
    train = [{"step": s, "reward_mean": 10.0 + s / 10} for s in range(1, 21)]
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump({"train": train, "validation": val}, f)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write("model:\n  algorithm: draftp\n  kl_coeff: 0.2\n  lv_copies: 0\nrm:\n  name: fake_reward\n")
    return val[-1], grids[20]


def test_demo_figure_step_runs_on_a_run_directory_without_training(tmp_path, monkeypatch):
    final, (base, tuned) = _fake_run(str(tmp_path / "run"))
    spec = importlib.util.spec_from_file_location("demo_under_test", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    drawn = {}
    real = figures.labelled_comparison

    def spy(*args, **kwargs):
        drawn["args"], drawn["kwargs"] = args, kwargs
        drawn["fig"] = real(*args, **kwargs)
        return drawn["fig"]

    monkeypatch.setattr(figures, "labelled_comparison", spy)
    out = tmp_path / "out"
    out.mkdir()
    paths = demo.write_figures(str(tmp_path / "run"), str(out))
    assert paths == {"before_after": str(out / "before_after.png"), "reward_curve": str(out / "reward_curve.png")}
    assert all(os.path.isfile(p) for p in paths.values())
    args = drawn["args"]
    # the step-20 grid, sliced: the same pixels the run saved for its final validation
    assert np.array_equal(args[0][3], (base[3].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    assert np.array_equal(args[1][19], (tuned[19].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    assert list(args[2]) == final["prompts"] and list(args[4]) == final["rewards_tuned"]
    texts = drawn_texts(drawn["fig"])
    title = args[6]
    assert title in texts
    gain = final["reward_tuned"] - final["reward_base"]
    for part in ("DRaFT+", "fake_reward", f"{final['reward_base']:.2f}", f"{final['reward_tuned']:.2f}",
                 f"+{gain:.2f} \u00b1 {final['gain_standard_error']:.2f}",
                 f"{final['images_improved']} of 20 images improved"):
        assert part in title, part
    assert "base" in texts and "DRaFT+\nfine-tuned" in texts
