"""Figures that read without the code: a labelled base-vs-fine-tuned comparison (prompts, per-image
rewards, named rows) and a reward curve with named axes, both drawn from what a run leaves on disk
(``images/val_step*.png``, ``metrics.json``, ``config.yaml``).

Only ``matplotlib.figure.Figure`` is used, never pyplot: no global figure state and no interactive
backend, so the functions are safe in a training process and in tests; PNGs go through Agg.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..files import atomic_save_figure

GAIN_COLOUR = "#1a7f37"
LOSS_COLOUR = "#cf222e"
NEUTRAL_COLOUR = "#57606a"

# DejaVu Sans averages about 0.55 em per character; 0.6 leaves room for wide letters so that a prompt
# list never runs into the next column.
_CHAR_EM = 0.6


def method_name(model_cfg: Dict) -> str:
    """The name a reader knows for the run's method, from the ``model`` section of its config."""
    algorithm = str(model_cfg.get("algorithm", "draftp")).lower()
    if algorithm == "draftp":
        if (model_cfg.get("lv_copies") or 0) > 0:
            return "DRaFT-LV"
        return "DRaFT+" if (model_cfg.get("kl_coeff") or 0) > 0 else "DRaFT"
    return {"alignprop": "AlignProp", "ddpo": "DDPO", "sdpo": "SDPO"}.get(algorithm, algorithm)


def signed(value: float, fmt: str = "{:.2f}") -> str:
    """``+1.25`` / ``−0.50`` (a true minus sign, the width of a plus) / ``±0.00``."""
    sign = "+" if value > 0 else "\u2212" if value < 0 else "\u00b1"
    return sign + fmt.format(abs(value))


def _hwc_uint8(img) -> np.ndarray:
    """HWC uint8 from an HWC array (uint8, or float in [0, 1]) or a CHW tensor/array."""
    a = img.detach().cpu().numpy() if hasattr(img, "detach") else np.asarray(img)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float64), 0.0, 1.0) * 255).round().astype(np.uint8)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return a[:, :, :3]


def split_grid(grid, n_images: int, n_rows: int = 2, cols: int = 16) -> List[List[np.ndarray]]:
    """Undo :func:`nemo_aligner_draft.models.callbacks.image_grid`: ``rows[r][i]`` is image ``i`` of
    row ``r`` (HWC uint8). Bands of ``n_rows`` rows × ``cols`` images, the last band padded.

    Reading the saved grid instead of re-rendering keeps the figure faithful to what the run logged.
    """
    g = _hwc_uint8(grid)
    cols = max(1, min(cols, n_images))
    bands = math.ceil(n_images / cols)
    height, width = g.shape[0], g.shape[1]
    if height % (bands * n_rows) or width % cols:
        raise ValueError(f"grid of {width}x{height} px does not split into {bands} bands of {n_rows} rows "
                         f"x {cols} images ({n_images} images)")
    h, w = height // (bands * n_rows), width // cols
    rows: List[List[np.ndarray]] = [[] for _ in range(n_rows)]
    for i in range(n_images):
        band, col = divmod(i, cols)
        for r in range(n_rows):
            y = (band * n_rows + r) * h
            rows[r].append(g[y:y + h, col * w:(col + 1) * w])
    return rows


def _resize(img: np.ndarray, cell_px: int) -> np.ndarray:
    """Scale to ``cell_px`` wide: whole-pixel upscaling (nearest) keeps small images honest, larger
    ones are filtered down so a 16-wide band of 512 px images stays a sensible file."""
    h, w = img.shape[:2]
    if w == cell_px:
        return img
    if cell_px % w == 0:
        k = cell_px // w
        return img.repeat(k, axis=0).repeat(k, axis=1)
    from PIL import Image

    new_h = max(1, round(h * cell_px / w))
    resample = Image.NEAREST if cell_px > w else Image.LANCZOS
    return np.asarray(Image.fromarray(img).resize((cell_px, new_h), resample))


def _strip(images: Sequence[np.ndarray], gap_px: int) -> np.ndarray:
    h = images[0].shape[0]
    parts = []
    for k, img in enumerate(images):
        if k:
            parts.append(np.full((h, gap_px, 3), 255, np.uint8))
        parts.append(img)
    return np.concatenate(parts, axis=1)


def labelled_comparison(base_images: Sequence, tuned_images: Sequence, prompts: Sequence[str],
                        rewards_base: Sequence[float], rewards_tuned: Sequence[float], path: Optional[str],
                        title: str, row_names: Sequence[str] = ("base", "fine-tuned"), cols: int = 16,
                        subtitle: Optional[str] = None, reward_fmt: str = "{:.2f}", cell_px: Optional[int] = None,
                        dpi: int = 100) -> Figure:
    """Bands of ``cols`` prompts: numbered columns, the base row above the fine-tuned row, each image's
    reward under it (under the fine-tuned one also the change, green up / red down), the band's
    numbered prompt list below it. Writes a PNG to ``path`` atomically (None: draw only) and returns
    the Figure so callers and tests can inspect what was drawn.
    """
    n = len(prompts)
    if not (len(base_images) == len(tuned_images) == len(rewards_base) == len(rewards_tuned) == n) or n == 0:
        raise ValueError(f"need the same non-zero number of base images ({len(base_images)}), tuned images "
                         f"({len(tuned_images)}), prompts ({n}), base rewards ({len(rewards_base)}) and "
                         f"tuned rewards ({len(rewards_tuned)})")
    base = [_hwc_uint8(x) for x in base_images]
    tuned = [_hwc_uint8(x) for x in tuned_images]
    # 128 px is the narrowest cell that holds "value  Δ" at 9 pt; 64 px images become exact 2× pixels
    if cell_px is None:
        w0 = base[0].shape[1]
        cell_px = w0 * math.ceil(128 / w0) if w0 < 128 else 128
    base = [_resize(x, cell_px) for x in base]
    tuned = [_resize(x, cell_px) for x in tuned]
    cell_h_px = base[0].shape[0]
    cols = max(1, min(cols, n))
    bands = math.ceil(n / cols)

    # Layout in inches, worked out top-down; the image cells map 1:1 to output pixels at ``dpi``.
    cw, ch = cell_px / dpi, cell_h_px / dpi
    gap_px = 6
    gx = gap_px / dpi
    left, right = 1.45, 0.3
    strip_w = cols * cw + (cols - 1) * gx
    prompt_pt, reward_pt, number_pt, name_pt, title_pt, sub_pt = 8.5, 9, 9, 10.5, 15, 10
    line_in = prompt_pt * 1.45 / 72
    char_in = _CHAR_EM * prompt_pt / 72
    labels = [f"{i + 1}. {p}" for i, p in enumerate(prompts)]
    longest = max(len(s) for s in labels)
    text_w = strip_w
    # as many prompt columns as the longest label allows under the images
    for pcols in (4, 3, 2, 1):
        max_chars = int((strip_w / pcols - 0.15) / char_in)
        if longest <= max_chars:
            break
    else:
        # a narrow band (few images) must not cut its prompts short: the list may run past the images,
        # up to 12 in, beyond which labels end in an ellipsis
        text_w = max(strip_w, min(longest * char_in + 0.15, 12.0))
        max_chars = int((text_w - 0.15) / char_in)
    # and the title must not be clipped by a figure only a few images wide (bold glyphs are wider)
    title_w = max(len(line) for line in title.split("\n")) * 0.65 * title_pt / 72
    sub_w = max(len(line) for line in subtitle.split("\n")) * _CHAR_EM * sub_pt / 72 if subtitle else 0.0
    fig_w = left + max(strip_w, text_w, title_w, sub_w) + right
    per_band = [min(cols, n - b * cols) for b in range(bands)]
    prompt_lines = math.ceil(cols / pcols)
    header_h, reward_h, row_gap, band_gap = 0.24, 0.24, 0.06, 0.42
    band_h = header_h + 2 * (ch + reward_h) + row_gap + 0.08 + prompt_lines * line_in
    title_lines = title.count("\n") + 1
    sub_lines = subtitle.count("\n") + 1 if subtitle else 0
    top_h = 0.25 + title_lines * 0.3 + sub_lines * 0.2 + 0.25
    fig_h = top_h + bands * band_h + (bands - 1) * band_gap + 0.25

    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi, facecolor="white")
    inch = fig.dpi_scale_trans

    def text(x, y_top, s, **kw):
        """Place text ``y_top`` inches below the top edge (dpi_scale_trans counts from the bottom).
        Prompts are user text: a "$" in one must print, not start mathtext."""
        return fig.text(x, fig_h - y_top, s, transform=inch, parse_math=False, **kw)

    text(left, 0.25, title, fontsize=title_pt, fontweight="bold", va="top", ha="left")
    if subtitle:
        text(left, 0.25 + title_lines * 0.3 + 0.05, subtitle, fontsize=sub_pt, color=NEUTRAL_COLOUR, va="top",
             ha="left")

    y = top_h
    for b in range(bands):
        start, count = b * cols, per_band[b]
        text(left - 0.12, y + header_h / 2, f"prompts {start + 1}\u2013{start + count}", fontsize=8.5,
             color=NEUTRAL_COLOUR, ha="right", va="center")
        for c in range(count):
            text(left + c * (cw + gx) + cw / 2, y + header_h / 2, str(start + c + 1), fontsize=number_pt,
                 fontweight="bold", ha="center", va="center")
        y += header_h
        for r, (row, name) in enumerate(((base, row_names[0]), (tuned, row_names[1]))):
            ax = fig.add_axes((left / fig_w, (fig_h - y - ch) / fig_h, (count * cw + (count - 1) * gx) / fig_w,
                               ch / fig_h))
            ax.imshow(_strip(row[start:start + count], gap_px), interpolation="nearest", aspect="auto")
            ax.set_axis_off()
            for c in range(count):  # a hairline frame: images on a white background would merge with the page
                fig.add_artist(Rectangle((left + c * (cw + gx), fig_h - y - ch), cw, ch, transform=inch,
                                         fill=False, edgecolor="#afb8c1", linewidth=0.6))
            text(left - 0.12, y + ch / 2, name, fontsize=name_pt, fontweight="bold", ha="right", va="center")
            y += ch
            for c in range(count):
                i = start + c
                cx = left + c * (cw + gx) + cw / 2
                ry = y + reward_h / 2
                if r == 0:
                    text(cx, ry, reward_fmt.format(rewards_base[i]), fontsize=reward_pt, ha="center", va="center")
                else:
                    d = float(rewards_tuned[i]) - float(rewards_base[i])
                    colour = GAIN_COLOUR if d > 0 else LOSS_COLOUR if d < 0 else NEUTRAL_COLOUR
                    text(cx - 0.03, ry, reward_fmt.format(rewards_tuned[i]), fontsize=reward_pt, ha="right",
                         va="center")
                    text(cx + 0.03, ry, signed(d, reward_fmt), fontsize=reward_pt, ha="left", va="center",
                         color=colour, fontweight="bold")
            y += reward_h + (row_gap if r == 0 else 0.08)
        col_w = text_w / pcols
        for k in range(count):
            i = start + k
            pc, line = divmod(k, prompt_lines)  # column-major: numbers run down, then across
            s = labels[i] if len(labels[i]) <= max_chars else labels[i][:max_chars - 1] + "\u2026"
            text(left + pc * col_w, y + line * line_in, s, fontsize=prompt_pt, ha="left", va="top")
        y += prompt_lines * line_in + band_gap

    if path is not None:
        _save(fig, path, dpi)
    return fig


def reward_curve(train: List[Dict], val: List[Dict], path: Optional[str], reward_name: str,
                 method: str = "fine-tuned", heldout: Optional[int] = None) -> Figure:
    """The run's reward over optimizer steps, with axes and legend that say what each point is."""
    fig = Figure(figsize=(8, 5), dpi=100, facecolor="white", layout="constrained")
    ax = fig.add_subplot()
    steps = [h["step"] for h in train]
    ax.plot(steps, [h["reward_mean"] for h in train], color="#0969da", alpha=0.55, lw=1.2,
            label=f"training: mean reward of the {method} samples in each optimizer step's batch (training prompts)")
    if val:
        n = heldout if heldout is not None else len(val[-1].get("prompts", [])) or None
        what = f"{n} held-out prompts" if n else "held-out prompts"
        vs = [v["step"] for v in val]
        ax.plot(vs, [v["reward_tuned"] for v in val], "o-", color=GAIN_COLOUR, lw=2, ms=7,
                label=f"validation, {method}: mean over {what}")
        ax.plot(vs, [v["reward_base"] for v in val], "s--", color=NEUTRAL_COLOUR, lw=1.5, ms=6,
                label=f"validation, base model: same {what} and initial noise")
        last = val[-1]
        gain = last["reward_tuned"] - last["reward_base"]
        se = last.get("gain_standard_error")
        note = f"held-out gain {signed(gain)}" + (f" \u00b1 {se:.2f} SE" if se is not None else "")
        ax.annotate(note, (vs[-1], last["reward_tuned"]), xytext=(-10, 10), textcoords="offset points",
                    ha="right", va="bottom", fontsize=10, color=GAIN_COLOUR if gain > 0 else LOSS_COLOUR,
                    fontweight="bold")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"reward: {reward_name} (higher is better)")
    ax.set_title(f"{method} fine-tuning on the {reward_name} reward")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", fontsize=9, frameon=False)
    if path is not None:
        _save(fig, path, 100)
    return fig


def drawn_texts(fig: Figure) -> List[str]:
    """Every string drawn on ``fig`` (figure texts, titles, labels, legend entries, annotations)."""
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def _save(fig: Figure, path: str, dpi: int) -> None:
    atomic_save_figure(fig, path, dpi=dpi, format="png", facecolor="white")
