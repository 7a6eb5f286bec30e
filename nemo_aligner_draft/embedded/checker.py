"""An analytic attribute checker for the shapes domain, independent of TinyCLIP.

Per image: label every pixel with its nearest palette colour (RGB Euclidean); the background is the
most frequent label; the object colour is the most frequent *shape* colour among the other pixels;
the object pixels (that colour's mask) split into 4-connected components of at least ``min_area``
pixels; each component's shape is read from its bounding-box fill ratio (area / box area):
triangle 1/2, circle π/4 ≈ 0.785, square 1, decided at the midpoints 0.64 and 0.89; the image's shape
is the majority over components. Chance levels on this domain: colour 1/6, background 1/6 (per
prompt the background is one of 6, or 5 when the shape colour is one of them), shape 1/3, count 1/3.
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import data as shapes

_NAMES = list(shapes.PALETTE)
_RGB = np.array([shapes.PALETTE[n] for n in _NAMES], dtype=np.float32) / 255.0
FILL_THRESHOLDS = (0.64, 0.89)  # midpoints between 1/2, π/4 and 1


@dataclass
class Attributes:
    background: Optional[str]
    color: Optional[str]
    shape: Optional[str]
    count: int
    fill_ratios: List[float]


def _as_hwc(image) -> np.ndarray:
    """Accepts uint8 ``[H, W, 3]`` or a float tensor/array ``[3, H, W]`` in [0, 1]; returns float HWC."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().float().numpy()
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = image.transpose(1, 2, 0)
    return image.astype(np.float32)


def palette_labels(image) -> np.ndarray:
    """Index into ``PALETTE`` of each pixel's nearest colour, ``[H, W]``."""
    hwc = _as_hwc(image)
    d = ((hwc[:, :, None, :] - _RGB[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def components(mask: np.ndarray) -> List[np.ndarray]:
    """4-connected components of a boolean mask, each as an ``[n, 2]`` array of (row, col)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        seen[r0, c0] = True
        queue, pixels = deque([(r0, c0)]), []
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
        out.append(np.array(pixels))
    return out


def shape_from_fill(ratio: float) -> str:
    if ratio < FILL_THRESHOLDS[0]:
        return "triangle"
    return "circle" if ratio < FILL_THRESHOLDS[1] else "square"


def read_attributes(image, min_area: int = 15) -> Attributes:
    labels = palette_labels(image)
    counts = Counter(labels.ravel().tolist())
    background = _NAMES[counts.most_common(1)[0][0]]
    shape_colour_ids = [_NAMES.index(c) for c in shapes.SHAPE_COLORS if c != background]
    fg = [(n, k) for k, n in counts.items() if k in shape_colour_ids and n >= min_area]
    if not fg:
        return Attributes(background, None, None, 0, [])
    color_id = max(fg)[1]
    comps = [c for c in components(labels == color_id) if len(c) >= min_area]
    ratios = []
    for comp in comps:
        (r0, c0), (r1, c1) = comp.min(0), comp.max(0)
        ratios.append(len(comp) / float((r1 - r0 + 1) * (c1 - c0 + 1)))
    votes = Counter(shape_from_fill(r) for r in ratios)
    shape = None
    if votes:
        best = max(votes.values())
        tied = {s for s, v in votes.items() if v == best}
        # ties go to the largest component's reading
        shape = next(shape_from_fill(r) for _, r in sorted(zip((-len(c) for c in comps), ratios))
                     if shape_from_fill(r) in tied)
    return Attributes(background, _NAMES[color_id], shape, len(comps), ratios)


def check(image, prompt: str, min_area: int = 15) -> Dict[str, bool]:
    """Does ``image`` show what the shapes-domain ``prompt`` says? Keys: color, shape, background, count."""
    want = shapes.parse_caption(prompt)
    got = read_attributes(image, min_area)
    return {
        "color": got.color == want["color"],
        "shape": got.shape == want["shape"],
        "background": got.background == want["background"],
        "count": got.count == want["count"],
    }


def accuracy(images: Sequence, prompts: Sequence[str], min_area: int = 15) -> Dict[str, float]:
    """Fraction of images whose colour / shape / background / count match their prompt, plus ``all``
    (colour, shape and background all right)."""
    if len(images) != len(prompts):
        raise ValueError(f"accuracy: {len(images)} images but {len(prompts)} prompts")
    results = [check(im, p, min_area) for im, p in zip(images, prompts)]
    keys = ["color", "shape", "background", "count"]
    out = {k: float(np.mean([r[k] for r in results])) for k in keys}
    out["all"] = float(np.mean([r["color"] and r["shape"] and r["background"] for r in results]))
    return out
