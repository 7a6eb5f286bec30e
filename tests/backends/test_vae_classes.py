"""A pipeline's VAE is loaded as the class its config names (SD's AutoencoderKL or the norm-free
AutoencoderTiny the embedded model ships); anything else, or a NeMo export of a non-KL VAE, fails
with one message naming the path."""
import json
import os
import shutil

import pytest
import torch

from nemo_aligner_draft.backends import load_backend
from nemo_aligner_draft.backends.base import load_vae


def _with_tiny_vae(src, dst):
    from diffusers import AutoencoderTiny

    shutil.copytree(src, dst)
    shutil.rmtree(os.path.join(dst, "vae"))
    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
                    latent_channels=4).save_pretrained(os.path.join(dst, "vae"))
    return dst


def test_tiny_vae_pipeline_loads_and_decodes(tiny_sd_dir, tmp_path):
    from diffusers import AutoencoderKL, AutoencoderTiny

    assert isinstance(load_vae(tiny_sd_dir), AutoencoderKL)
    path = _with_tiny_vae(tiny_sd_dir, str(tmp_path / "sd"))
    backend = load_backend(path)
    assert isinstance(backend.vae, AutoencoderTiny) and backend.vae_scale_factor == 8
    latents = torch.randn(2, 4, 4, 4, requires_grad=True)
    images = backend.decode(latents)
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    images.mean().backward()  # reward gradients flow through it like through AutoencoderKL
    assert latents.grad is not None and latents.grad.abs().sum() > 0


def test_unknown_vae_class_is_named(tiny_sd_dir, tmp_path):
    path = str(tmp_path / "sd")
    shutil.copytree(tiny_sd_dir, path)
    cfg = os.path.join(path, "vae", "config.json")
    data = json.load(open(cfg))
    data["_class_name"] = "AutoencoderKLWan"
    json.dump(data, open(cfg, "w"))
    with pytest.raises(ValueError, match=r"vae/config.json: _class_name 'AutoencoderKLWan' is not a supported VAE"):
        load_backend(path)


def test_nemo_export_refuses_tiny_vae(tiny_sd_dir, tmp_path):
    from nemo_aligner_draft.export.to_nemo import export_nemo

    path = _with_tiny_vae(tiny_sd_dir, str(tmp_path / "sd"))
    out = tmp_path / "out.nemo"
    with pytest.raises(ValueError, match="holds an AutoencoderKL VAE, this pipeline's VAE is AutoencoderTiny"):
        export_nemo(path, str(out))
    assert not out.exists()
