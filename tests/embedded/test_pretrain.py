"""The pretraining script end to end in its --quick setting: it writes a diffusers pipeline that the
project's loader reads and samples from, a TinyCLIP that the generic HF-CLIP reward loader reads, the
prompt files, and the same weights when rerun with the same seed."""
import importlib.util
import json
import os

import torch
from safetensors.torch import load_file

from nemo_aligner_draft.backends import load_backend
from nemo_aligner_draft.embedded import data as shapes
from nemo_aligner_draft.embedded.evaluate import sample_images
from nemo_aligner_draft.embedded.pretrain import PretrainConfig, pretrain
from nemo_aligner_draft.rewards import build_reward

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "mm", "stable_diffusion", "pretrain_embedded.py")


def _run_script(argv):
    spec = importlib.util.spec_from_file_location("pretrain_embedded", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)


def test_quick_script_writes_loadable_pipeline_and_tinyclip(tmp_path):
    out = str(tmp_path / "embedded")
    _run_script(["--quick", "--out", out])
    backend = load_backend(os.path.join(out, "sd"))
    assert backend.latent_channels == 4 and backend.vae_scale_factor == 8
    assert backend.tokenizers[0].vocab_size == 49408
    images = sample_images(backend, ["a red circle on a blue background", ""], steps=2)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32 and torch.isfinite(images).all()
    assert all(m.dtype == torch.float32 for m in [backend.unet, backend.vae, backend.text_encoders[0]])

    reward = build_reward("clip_score", path=os.path.join(out, "tinyclip"))
    assert reward(images, ["a red circle on a blue background", "a cat"]).shape == (2,)
    log = json.load(open(os.path.join(out, "pretrain_sd.json")))
    assert log["config"]["unet_steps"] == PretrainConfig.quick().unet_steps
    assert open(os.path.join(out, "heldout_prompts.txt")).read().splitlines() == shapes.prompts("heldout")


def _weights(directory):
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            if f.endswith(".safetensors"):
                for k, v in load_file(os.path.join(root, f)).items():
                    out[os.path.relpath(os.path.join(root, f), directory) + ":" + k] = v
    return out


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    cfg = PretrainConfig.quick()
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        cfg.seed = seed
        pretrain(str(tmp_path / name), cfg)
    a, b, c = (_weights(str(tmp_path / n)) for n in "abc")
    assert a.keys() == b.keys() == c.keys() and len(a) > 100
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_weighted_reconstruction_loss_against_plain_sums():
    from nemo_aligner_draft.embedded.pretrain import _weighted_rec_loss

    g = torch.Generator().manual_seed(0)
    x = torch.full((2, 3, 4, 4), -0.5)
    x[0, :, 1, 1] = 0.7  # one shape pixel in image 0, two in image 1 (one differs in a single channel)
    x[1, :, 2, 2] = 0.3
    x[1, 0, 3, 0] = 0.9
    recon = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1
    d = recon - x
    # weight 0 is the unweighted L1 + MSE
    assert torch.allclose(_weighted_rec_loss(recon, x, 0.0), d.abs().mean() + (d ** 2).mean())
    num, den = 0.0, 0.0
    for b in range(2):
        for i in range(4):
            for j in range(4):
                w = 1.0 + 5.0 * float(any(x[b, c, i, j] != x[b, c, 0, 0] for c in range(3)))
                num += w * float((d[b, :, i, j].abs() + d[b, :, i, j] ** 2).sum())
                den += w * 3
    assert abs(_weighted_rec_loss(recon, x, 5.0).item() - num / den) < 1e-5


def test_edge_weight_against_plain_neighbour_loop():
    from nemo_aligner_draft.embedded.pretrain import _weighted_rec_loss

    g = torch.Generator().manual_seed(1)
    x = torch.full((1, 3, 5, 5), -0.5)
    x[0, :, 1:3, 1:3] = 0.7  # a 2×2 square: its 4 pixels and their 8 outside 4-neighbours are outline
    x[0, 2, 4, 4] = 0.1  # one corner pixel differing in one channel
    recon = torch.rand(1, 3, 5, 5, generator=g) * 2 - 1
    d = recon - x
    num, den = 0.0, 0.0
    for i in range(5):
        for j in range(5):
            shape = any(x[0, c, i, j] != x[0, c, 0, 0] for c in range(3))
            edge = any(0 <= a < 5 and 0 <= b < 5 and any(x[0, c, a, b] != x[0, c, i, j] for c in range(3))
                       for a, b in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)))
            w = 1.0 + 2.0 * float(shape) + 3.0 * float(edge)
            num += w * float((d[0, :, i, j].abs() + d[0, :, i, j] ** 2).sum())
            den += w * 3
    assert abs(_weighted_rec_loss(recon, x, 2.0, 3.0).item() - num / den) < 1e-5
    assert not torch.isclose(_weighted_rec_loss(recon, x, 2.0, 3.0), _weighted_rec_loss(recon, x, 2.0, 0.0))
