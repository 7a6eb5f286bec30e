"""The procedural shapes domain: 64×64 RGB scenes of 1–3 flat shapes with a caption from a grammar.

A scene is one shape kind (circle / square / triangle) in one named colour, drawn ``count`` times on a
background of another named colour; a single shape may also be placed at one of nine named positions.
Captions: ``"a red circle at the top left on a blue background"``, ``"two green squares on a white
background"``. Everything is deterministic from a seed (``numpy.random.default_rng``).

Held-out split: :data:`HELD_OUT_TRIPLES` lists (colour, shape, background) combinations that the
training split never draws, in any count or position. Every pair inside a held-out triple (colour with
shape, colour on background, shape on background) still occurs in training, so the held-out prompts
test composition of seen attributes, not unseen words.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

IMAGE_SIZE = 64

# RGB in 0..255. Shape colours and background colours share one palette so the checker can classify
# every pixel by its nearest palette entry.
PALETTE = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (150, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPE_COLORS = ("red", "orange", "yellow", "green", "blue", "purple")
BACKGROUNDS = ("white", "black", "gray", "blue", "green", "yellow")
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
# Nine positions: name → (column, row) on a 3×3 grid; only single shapes get a position phrase.
POSITIONS = {
    "at the top left": (0, 0), "at the top": (1, 0), "at the top right": (2, 0),
    "on the left": (0, 1), "in the center": (1, 1), "on the right": (2, 1),
    "at the bottom left": (0, 2), "at the bottom": (1, 2), "at the bottom right": (2, 2),
}
GRID_CENTERS = (16, 32, 48)

HELD_OUT_TRIPLES = frozenset({
    ("red", "triangle", "white"), ("orange", "circle", "black"), ("yellow", "square", "blue"),
    ("green", "circle", "gray"), ("blue", "triangle", "yellow"), ("purple", "square", "green"),
    ("red", "square", "gray"), ("green", "triangle", "black"),
})


@dataclass(frozen=True)
class Scene:
    """One image's content. ``centers``: pixel coordinates (x, y) per shape; ``half_size``: pixels."""

    color: str
    shape: str
    background: str
    count: int
    position: Optional[str]
    centers: Tuple[Tuple[float, float], ...]
    half_size: float

    def caption(self) -> str:
        return caption_for(self.color, self.shape, self.background, self.count, self.position)


def caption_for(color: str, shape: str, background: str, count: int = 1, position: Optional[str] = None) -> str:
    noun = shape if count == 1 else shape + "s"
    where = f" {position}" if position else ""
    return f"{COUNT_WORDS[count]} {color} {noun}{where} on a {background} background"


def parse_caption(caption: str) -> dict:
    """Inverse of :func:`caption_for` (the checker reads prompts with it). Raises on other text."""
    words = caption.strip().lower()
    for count, word in COUNT_WORDS.items():
        if words.startswith(word + " "):
            rest = words[len(word) + 1:]
            break
    else:
        raise ValueError(f"not a shapes-domain caption (count word): {caption!r}")
    try:
        color, noun, rest = rest.split(" ", 2)
    except ValueError:
        raise ValueError(f"not a shapes-domain caption: {caption!r}") from None
    shape = noun[:-1] if count > 1 and noun.endswith("s") else noun
    if color not in SHAPE_COLORS or shape not in SHAPES or not rest.endswith(" background"):
        raise ValueError(f"not a shapes-domain caption: {caption!r}")
    head, _, tail = (" " + rest).rpartition(" on a ")
    head = head.strip()
    background = tail[: -len(" background")]
    position = head if head else None
    if background not in BACKGROUNDS or (position is not None and position not in POSITIONS):
        raise ValueError(f"not a shapes-domain caption: {caption!r}")
    return {"color": color, "shape": shape, "background": background, "count": count, "position": position}


def _triples(split: str) -> List[Tuple[str, str, str]]:
    allowed = [(c, s, b) for c, s, b in itertools.product(SHAPE_COLORS, SHAPES, BACKGROUNDS) if c != b]
    if split == "train":
        return [t for t in allowed if t not in HELD_OUT_TRIPLES]
    if split == "heldout":
        return [t for t in allowed if t in HELD_OUT_TRIPLES]
    if split == "all":
        return allowed
    raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")


def prompts(split: str = "train") -> List[str]:
    """Every caption the grammar can produce for ``split``, sorted (train: 1,092, held-out: 96)."""
    out = []
    for c, s, b in _triples(split):
        out += [caption_for(c, s, b, n) for n in COUNT_WORDS]
        out += [caption_for(c, s, b, 1, p) for p in POSITIONS]
    return sorted(out)


def write_prompt_files(out_dir: str) -> Tuple[str, str]:
    """Write ``train_prompts.txt`` and ``heldout_prompts.txt`` (one prompt a line); return both paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for split, name in (("train", "train_prompts.txt"), ("heldout", "heldout_prompts.txt")):
        path = os.path.join(out_dir, name)
        with open(path, "w") as f:
            f.write("\n".join(prompts(split)) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def sample_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    triples = _triples(split)
    color, shape, background = triples[rng.integers(len(triples))]
    count = int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))
    position = None
    if count == 1:
        half = float(rng.uniform(8.5, 12.5))
        if rng.random() < 0.6:
            position = list(POSITIONS)[rng.integers(len(POSITIONS))]
            col, row = POSITIONS[position]
            centers = ((GRID_CENTERS[col] + rng.uniform(-2, 2), GRID_CENTERS[row] + rng.uniform(-2, 2)),)
        else:
            centers = (tuple(rng.uniform(half + 1, IMAGE_SIZE - half - 1, size=2)),)
    else:
        half = float(rng.uniform(6.0, 8.5))
        centers = []
        while len(centers) < count:  # rejection: shapes must not touch, so the count stays visible
            c = rng.uniform(half + 1, IMAGE_SIZE - half - 1, size=2)
            if all(np.max(np.abs(c - np.array(o))) > 2 * half + 3 for o in centers):
                centers.append(tuple(c))
        centers = tuple(centers)
    centers = tuple((float(x), float(y)) for x, y in centers)
    return Scene(color, shape, background, count, position, centers, half)


def shape_mask(shape: str, cx: float, cy: float, half: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean ``[size, size]`` mask, pixel centres at integer + 0.5.

    Bounding-box fill ratios: square 1, circle π/4, triangle (apex up, base = height = 2·half) 1/2.
    """
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":
        # apex at (cx, cy − half), base on y = cy + half from cx − half to cx + half
        t = (dy + half) / (2 * half)
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= half * t)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Scene → uint8 image ``[size, size, 3]``."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = PALETTE[scene.background]
    for cx, cy in scene.centers:
        img[shape_mask(scene.shape, cx, cy, scene.half_size, size)] = PALETTE[scene.color]
    return img


def make_dataset(n: int, seed: int, split: str = "train") -> Tuple[np.ndarray, List[str]]:
    """``n`` scenes from ``split``: images uint8 ``[n, 64, 64, 3]`` and their captions."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions = []
    for i in range(n):
        scene = sample_scene(rng, split)
        images[i] = render(scene)
        captions.append(scene.caption())
    return images, captions


def to_tensor(images: np.ndarray):
    """uint8 ``[N, H, W, 3]`` → float tensor ``[N, 3, H, W]`` in [0, 1] (the reward convention)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0

