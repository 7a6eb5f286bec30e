"""The shapes benchmark: rewards on the embedded model with headroom on every image.

The embedded base model's known defect is shape (the checker reads the prompted shape on 40 % of
held-out images, chance 33 %): squares come out with rounded corners, triangles with soft tips, so
both read as circles, and edges are blurred. Two rewards score it, one differentiable, one not:

* ``embedded_shape`` (differentiable): fidelity to the ideal render. The checker reads where the
  image draws its object (the bounding box of the largest component of the prompted colour); the
  template is the domain's own render of the prompt with the object there (:func:`template`);
  ``r = −1000 · mean_pixels ‖x − template‖²`` over RGB in [0, 1]. The template is a reading of the
  image, held fixed; the gradient is the squared error's, dense over every pixel. Renders of the
  domain score −2.2 on average (pixel rounding of the box), the base model −24.9 ± 20.3 on the
  held-out single-object prompts (squares −34.5, triangles −24.4, circles −11.4): every image can
  improve. Erasing or shrinking the object does not help: the template keeps the domain's size range.
* ``embedded_shape_checker`` (not differentiable): the checker's own shape quantity, the bounding-box
  fill ratio of the largest object component (triangle ½, circle π/4, square 1),
  ``r = −100 · |fill − target(prompted shape)|``; −100 when no component of 15 pixels is found.
  Renders −1.3, the base model −18.3. The policy-gradient methods' non-differentiable twin, and an
  independent reading of whether a model's gain on ``embedded_shape`` is a gain in shape.

Prompt sets (``builtin:``): ``embedded_shapes_eval`` — 18 single-object training-split prompts, one
per (colour, shape), each on a training background, no position phrase; ``embedded_shapes_train`` —
those 18, 8 times each (144 lines), so one pass of the prompt sampler repeats every prompt 8 times and
per-prompt statistics fill within a few policy-gradient epochs; validation renders the 18 from 4
fixed latents each (``model.diversity.samples_per_prompt: 4``), latents training never draws.
``embedded_shapes_heldout`` — the 80 single-object held-out prompts (held-out (colour, shape,
background) triples, with and without a position): composition the model never saw. Single
objects only: the template has one object, and a second one drawn where the prompt asks for one is
then an error the reward counts.
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch

from ..rewards.base import Reward, register_reward
from . import checker
from . import data as shapes
from . import models

# bounding-box fill ratio of each shape (the checker's shape reading): triangle 1/2, circle pi/4, square 1
FILL_TARGETS = {"triangle": 0.5, "circle": 0.785, "square": 1.0}
MIN_AREA = 15  # the checker's smallest component, in pixels
HALF_RANGE = (8.5, 12.5)  # a single object's half size in the domain's scenes
_COLOURS = list(shapes.PALETTE)


def _parse_all(prompts: Sequence[str], name: str, n: int):
    if prompts is None or len(prompts) != n:
        raise ValueError(f"{name}: {n} images need as many shapes-domain prompts")
    out = []
    for p in prompts:
        try:
            out.append(shapes.parse_caption(p))
        except ValueError as e:
            raise ValueError(f"{name}: prompt {p!r} is not a shapes-domain caption ({e})") from None
    return out


def _largest_component(image, colour: str):
    labels = checker.palette_labels(image)
    comps = [c for c in checker.components(labels == _COLOURS.index(colour)) if len(c) >= MIN_AREA]
    return max(comps, key=len) if comps else None


def template(image: torch.Tensor, prompt: str) -> torch.Tensor:
    """The ideal render of ``prompt`` where the image draws its object; ``[3, H, W]`` in [0, 1].

    The object's place and size come from the checker's reading of ``image`` (the bounding box of the
    largest component of the prompted colour): centre = box centre, half size = half the longer box
    side, clamped to the domain's single-object range (8.5 to 12.5 px) so that shrinking the object does
    not shrink its template. Without such a component the template's object sits in the centre at half
    size 10.5, so erasing the object costs its whole area. A reading of the image, not differentiable."""
    want = shapes.parse_caption(prompt)
    size = image.shape[-1]
    comp = _largest_component(image, want["color"])
    if comp is not None:
        (r0, c0), (r1, c1) = comp.min(0), comp.max(0)
        cx, cy = (c0 + c1 + 1) / 2.0, (r0 + r1 + 1) / 2.0
        half = max(c1 - c0 + 1, r1 - r0 + 1) / 2.0
    else:
        cx = cy = size / 2.0
        half = 10.5
    half = float(np.clip(half, *HALF_RANGE))
    scene = shapes.Scene(want["color"], want["shape"], want["background"], 1, None, ((float(cx), float(cy)),), half)
    return torch.from_numpy(shapes.render(scene, size)).permute(2, 0, 1).float() / 255.0


class _ShapesReward(Reward):
    """Carries the shipped TinyCLIP's image tower for validation's diversity metric (the mean pairwise
    embedding distance, per prompt when validation renders each prompt several times); the score
    itself does not use it."""

    probe_prompt = "a red circle on a white background"

    def __init__(self):
        super().__init__()
        self.embedder = models.load_tinyclip(models.tinyclip_path()).requires_grad_(False)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(models.tinyclip_image_features(self.embedder, images), dim=-1)


class ShapeTemplate(_ShapesReward):
    """``−1000 · mean_pixels ‖x − template‖²`` (RGB in [0, 1]); images ``[B, 3, H, W]`` → ``[B]``, differentiable."""

    name = "embedded_shape"

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        _parse_all(prompts, self.name, images.shape[0])
        with torch.no_grad():
            ideal = torch.stack([template(x, p) for x, p in zip(images.detach().float().cpu(), prompts)])
        x = images if images.dtype == torch.float64 else images.float()
        return -1000.0 * ((x - ideal.to(x)) ** 2).sum(dim=1).mean(dim=(1, 2))


def hard_fill(image, colour: str):
    """The checker's reading: fill ratio (area / bounding-box area) of the largest component of ``colour``, or None."""
    comp = _largest_component(image, colour)
    if comp is None:
        return None
    (r0, c0), (r1, c1) = comp.min(0), comp.max(0)
    return len(comp) / float((r1 - r0 + 1) * (c1 - c0 + 1))


class ShapeFillChecker(_ShapesReward):
    """``−100 · |hard fill − target(prompted shape)|`` from the analytic checker; −100 when no object
    is found. Not differentiable."""

    name = "embedded_shape_checker"
    differentiable = False

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        wants = _parse_all(prompts, self.name, images.shape[0])
        out = []
        for image, want in zip(images.detach().float().cpu(), wants):
            fill = hard_fill(image, want["color"])
            out.append(-100.0 if fill is None else -100.0 * abs(fill - FILL_TARGETS[want["shape"]]))
        return torch.tensor(out, dtype=torch.float32, device=images.device)


@register_reward("embedded_shape")
def embedded_shape(**kwargs) -> Reward:
    if kwargs:
        raise ValueError(f"reward 'embedded_shape' takes no arguments, got {sorted(kwargs)}")
    return ShapeTemplate()


@register_reward("embedded_shape_checker")
def embedded_shape_checker(**kwargs) -> Reward:
    if kwargs:
        raise ValueError(f"reward 'embedded_shape_checker' takes no arguments, got {sorted(kwargs)}")
    return ShapeFillChecker()


REPEATS = 8  # copies of each training prompt in the training set


def eval_prompts() -> List[str]:
    """18 prompts: every (colour, shape) once, no position, background the k-th allowed training one."""
    out = []
    for i, (colour, shape) in enumerate((c, s) for c in shapes.SHAPE_COLORS for s in shapes.SHAPES):
        backgrounds = [b for b in shapes.BACKGROUNDS
                       if b != colour and (colour, shape, b) not in shapes.HELD_OUT_TRIPLES]
        out.append(shapes.caption_for(colour, shape, backgrounds[i % len(backgrounds)]))
    return out


def train_prompts() -> List[str]:
    """:func:`eval_prompts` ``REPEATS`` times (144 lines): one pass of the prompt sampler (without
    replacement) draws every prompt 8 times, so a policy-gradient epoch of up to 144 samples has up
    to 8 returns per prompt and per-prompt statistics fill within a few epochs."""
    return eval_prompts() * REPEATS


def heldout_prompts() -> List[str]:
    """The 80 single-object held-out prompts (sorted, as ``prompts('heldout')``)."""
    return [p for p in shapes.prompts("heldout") if shapes.parse_caption(p)["count"] == 1]


def single_object_renders(n: int, seed: int = 0, split: str = "train"):
    """``n`` single-object scenes: images ``[n, 3, 64, 64]`` in [0, 1] and their captions."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    while len(images) < n:
        scene = shapes.sample_scene(rng, split)
        if scene.count == 1:
            images.append(shapes.render(scene))
            captions.append(scene.caption())
    return shapes.to_tensor(np.stack(images)), captions
