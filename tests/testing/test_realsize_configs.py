"""The full-size architectures of testing/realsize.py (used by benchmarks/bench_realsize_cpu.py and the
memory model) are the published ones: built on the meta device (no memory), their parameter counts
equal those of the released checkpoints — SD1.5's UNet / VAE / CLIP-L text encoder, SDXL-base's UNet
and OpenCLIP-bigG text encoder, CLIP ViT-H-14 (PickScore, HPSv2) and ViT-L-14 (aesthetic predictor)."""
import pytest
import torch

from nemo_aligner_draft.testing import realsize as R


def _count(build):
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def _clip(spec):
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig(text_config=spec["text_config"], vision_config=spec["vision_config"],
                                projection_dim=spec["projection_dim"]))


@pytest.mark.parametrize("name,build,published", [
    ("SD1.5 UNet", lambda: __import__("diffusers").UNet2DConditionModel(**R.SD15_UNET), 859_520_964),
    ("SD1.5 VAE", lambda: __import__("diffusers").AutoencoderKL(**R.SD15_VAE), 83_653_863),
    ("SD1.5 text encoder", lambda: __import__("transformers").CLIPTextModel(
        __import__("transformers").CLIPTextConfig(**R.SD15_TEXT)), 123_060_480),
    ("SDXL UNet", lambda: __import__("diffusers").UNet2DConditionModel(**R.SDXL_UNET), 2_567_463_684),
    ("SDXL text encoder 2", lambda: __import__("transformers").CLIPTextModelWithProjection(
        __import__("transformers").CLIPTextConfig(**R.SDXL_TEXT_2)), 694_659_840),
    ("CLIP ViT-H-14", lambda: _clip(R.CLIP_VIT_H_14), 986_109_441),
    ("CLIP ViT-L-14", lambda: _clip(R.CLIP_VIT_L_14), 427_616_513),
])
def test_parameter_counts_are_the_published_ones(name, build, published):
    assert _count(build) == published, name


def test_memory_model_weights_are_the_parameter_bytes():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "memory_model.py")
    spec = importlib.util.spec_from_file_location("memory_model", path)
    mm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mm)
    zero = {"unet": 0.0, "vae": 0.0, "reward": 0.0, "bwd": 0.0}
    fp32 = mm.predict(zero, "sd", 1, 50, 1, 512, 512, "32")
    bf16 = mm.predict(zero, "sd", 1, 50, 1, 512, 512, "bf16-mixed")
    vae_decoder = 83_653_863 - _count(lambda: __import__("diffusers").AutoencoderKL(**R.SD15_VAE).encoder)
    total = 859_520_964 + vae_decoder + 123_060_480 + 986_109_441
    assert abs(fp32["weights"] * 2**30 - 4 * total) < 1
    # bf16-mixed: text encoder, VAE and reward at 2 bytes, the UNet base stays fp32
    assert abs(bf16["weights"] * 2**30 - (4 * 859_520_964 + 2 * (total - 859_520_964))) < 1
