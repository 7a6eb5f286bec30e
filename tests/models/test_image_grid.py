"""The validation grid wraps long rows into bands: base above tuned for every image, same column."""
import torch

from nemo_aligner_draft.models.callbacks import image_grid


def test_grid_wraps_into_bands_and_keeps_pairs_aligned():
    n, h, w = 20, 2, 3
    base = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, h, w) / 100
    tuned = base + 0.5
    grid = image_grid([base, tuned], cols=8)
    assert grid.shape == (3, 3 * 2 * h, 8 * w)  # 3 bands (8 + 8 + 4 images) of 2 rows
    for i in range(n):
        band, col = divmod(i, 8)
        top = grid[:, (2 * band) * h:(2 * band + 1) * h, col * w:(col + 1) * w]
        bottom = grid[:, (2 * band + 1) * h:(2 * band + 2) * h, col * w:(col + 1) * w]
        assert torch.equal(top, base[i]) and torch.equal(bottom, tuned[i])
    assert torch.equal(grid[:, 4 * h:, 4 * w:], torch.ones(3, 2 * h, 4 * w))  # padding of the last band


def test_short_rows_stay_one_band():
    x = torch.rand(3, 3, 4, 4)
    assert torch.equal(image_grid([x, 1 - x]), torch.cat([torch.cat(list(x), 2), torch.cat(list(1 - x), 2)], 1))
