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


def _mm(name, **kw):
    import diffusers

    return lambda: getattr(diffusers, name)(**kw)


def _t5():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**R.T5_XXL))


# Published counts of the flow models. FLUX.1-dev / -schnell transformer and the T5-XXL encoder: the total_size of
# their bf16 safetensors index files on the hub (black-forest-labs/FLUX.1-dev transformer/ 23,802,816,640 bytes,
# FLUX.1-schnell 23,782,357,120, text_encoder_2/ 9,524,621,312), halved. SD3.5-Medium: keras-hub's preset
# metadata (keras_hub/src/models/stable_diffusion_3/stable_diffusion_3_presets.py, "params": 3,371,793,763 for
# CLIP-L + CLIP-G + MMDiT-X + VAE), which also counts the 384² × 1536 fixed position table diffusers keeps as a
# buffer; SD3-Medium's 2,987,080,931 checks the same sum with the 192² table and no SD3.5 options.
@pytest.mark.parametrize("name,build,published", [
    ("FLUX.1-dev transformer", _mm("FluxTransformer2DModel", **R.FLUX_DEV_TRANSFORMER), 23_802_816_640 // 2),
    ("FLUX.1-schnell transformer", _mm("FluxTransformer2DModel", **R.FLUX_SCHNELL_TRANSFORMER), 23_782_357_120 // 2),
    ("T5-XXL encoder", _t5, 9_524_621_312 // 2),
])
def test_flow_model_parameter_counts_are_the_published_ones(name, build, published):
    assert _count(build) == published, name


@pytest.mark.parametrize("variant,published", [("sd3.5-medium", 3_371_793_763), ("sd3-medium", 2_987_080_931)])
def test_sd3_medium_totals_are_keras_hubs(variant, published):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    spec = dict(R.SD35M_TRANSFORMER)
    if variant == "sd3-medium":
        spec.update(pos_embed_max_size=192)
        spec.pop("qk_norm"), spec.pop("dual_attention_layers")
    position_table = spec["pos_embed_max_size"] ** 2 * spec["caption_projection_dim"]
    total = (_count(_mm("SD3Transformer2DModel", **spec)) + position_table
             + _count(_mm("AutoencoderKL", **R.SD3_VAE))
             + _count(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**R.SD3_CLIP_L)))
             + _count(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**R.SD3_CLIP_G))))
    assert total == published, variant


def test_memory_model_counts_the_flow_models_published_weights_and_sd3s_position_table():
    """The memory model's weights for SD3.5-M and FLUX.1-dev are the published parameter counts (checked above)
    at their storage widths; SD3's fixed position table (a buffer, not a parameter) is counted on its own."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "memory_model.py")
    spec = importlib.util.spec_from_file_location("memory_model", path)
    mm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mm)
    zero = {"unet": 0.0, "vae": 0.0, "reward": 0.0, "bwd": 0.0}
    t5, clip_l_proj, clip_l = 9_524_621_312 // 2, 123_650_304, 123_060_480
    vae = _count(_mm("AutoencoderKL", **R.SD3_VAE)) - _count(lambda: __import__("diffusers").AutoencoderKL(**R.SD3_VAE).encoder)
    pick = 986_109_441
    sd3 = mm.predict(zero, "sd3", 1, 40, 1, 512, 512, "32")
    assert abs(sd3["weights"] * 2**30 - 4 * (2_243_171_520 + vae + clip_l_proj + 694_659_840 + t5 + pick)) < 1
    assert abs(sd3["buffers"] * 2**30 - 4 * 384**2 * 1536) < 1
    flux = mm.predict(zero, "flux", 1, 28, 1, 512, 512, "bf16-mixed", unet_dtype="bf16")
    # bf16-mixed with the transformer base in bf16: all at 2 bytes but the VAE (force_upcast keeps it in fp32)
    assert abs(flux["weights"] * 2**30 - (2 * (23_802_816_640 // 2 + clip_l + t5 + pick) + 4 * vae)) < 1
    assert flux["buffers"] == 0
