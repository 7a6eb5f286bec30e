"""``nad-convert to-nemo``: the ``.nemo`` is laid out as NeMo's SaveRestoreConnector writes it, its
``model_config.yaml`` carries the keys NeMo v2.1.0's restore reads (literal lists from the source, line
numbers below), and no tensor is lost — a dropped one is an error, not a log line."""
import io
import tarfile

import pytest
import torch
import yaml

from nemo_aligner_draft.cli.convert import main as convert
from nemo_aligner_draft.export.ldm_layout import ConversionError

# nemo/collections/multimodal/models/text_to_image/stable_diffusion/ldm/ddpm.py, read as cfg.<key>:
DDPM_KEYS = [
    "parameterization",  # 127
    "clip_denoised", "log_every_t", "first_stage_key", "image_size", "channels",  # 131-135
    "use_positional_encodings",  # 137
    "unet_config", "conditioning_key", "inductor", "inductor_cudagraphs",  # 138 DiffusionWrapper(...)
    "v_posterior", "original_elbo_weight", "l_simple_weight",  # 142-144
    "given_betas", "beta_schedule", "timesteps", "linear_start", "linear_end", "cosine_s",  # 146-153 register_schedule
    "loss_type", "learn_logvar", "logvar_init",  # 155-158
]
LATENT_DIFFUSION_KEYS = [
    "num_timesteps_cond", "scale_by_std",  # 528-529
    "concat_mode", "cond_stage_config", "ckpt_path", "ignore_keys",  # 533-539
    "precision", "cond_stage_trainable", "cond_stage_key",  # 542-545
    "first_stage_config", "scale_factor",  # 548-553
    "cond_stage_forward", "text_embedding_dropout_rate", "fused_opt",  # 556-560
]
# nemo/core/classes/modelPT.py:118-126 (target, nemo_version); megatron_base_model.py:125, 148
MODEL_PT_KEYS = ["target", "nemo_version", "precision", "optim"]
# diffusion_engine.py:81-84, 129-130
DIFFUSION_ENGINE_KEYS = ["unet_config", "denoiser_config", "first_stage_config", "conditioner_config", "scale_factor",
                         "disable_first_stage_autocast"]
# openaimodel.py:569-609, the UNetModel arguments without a default and those this model needs
UNET_ARGS = ["_target_", "image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks",
             "attention_resolutions", "channel_mult", "num_heads", "num_head_channels", "use_spatial_transformer",
             "transformer_depth", "context_dim", "use_linear_in_transformer", "legacy", "from_pretrained", "from_NeMo"]
UNET_SIGNATURE = {"image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks",
                  "attention_resolutions", "dropout", "channel_mult", "conv_resample", "dims", "num_classes",
                  "use_checkpoint", "num_heads", "num_head_channels", "num_heads_upsample", "resblock_gn_groups",
                  "use_scale_shift_norm", "resblock_updown", "use_new_attention_order", "use_spatial_transformer",
                  "transformer_depth", "context_dim", "n_embed", "legacy", "disable_self_attentions",
                  "num_attention_blocks", "disable_middle_self_attn", "use_linear_in_transformer", "adm_in_channels",
                  "offload_to_cpu", "transformer_depth_middle", "from_pretrained", "from_NeMo",
                  "use_flash_attention", "use_te_dpa", "unet_precision", "lora_network_alpha", "timesteps",
                  "use_te_fp8"}
# ldm/autoencoder.py:311-323 and the Encoder/Decoder arguments of diffusionmodules/model.py
VAE_SIGNATURE = {"ddconfig", "embed_dim", "lossconfig", "ckpt_path", "ignore_keys", "image_key", "colorize_nlabels",
                 "from_NeMo", "monitor", "from_pretrained"}
DDCONFIG = {"ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv",
            "in_channels", "resolution", "z_channels", "double_z", "use_linear_attn", "attn_type"}
# DDPM.register_schedule persistent buffers, ddpm.py:196-222 (lvlb_weights is persistent=False)
SCHEDULE_BUFFERS = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2"]


def _archive(path):
    with tarfile.open(path) as t:
        names = sorted(t.getnames())
        config = yaml.safe_load(t.extractfile("./model_config.yaml").read())
        weights = torch.load(io.BytesIO(t.extractfile("./model_weights.ckpt").read()), weights_only=True)
    return names, config, weights


def test_sd_nemo_has_the_layout_and_keys_nemo_restores(tiny_sd_dir, tmp_path):
    out = str(tmp_path / "sd.nemo")
    assert convert(["to-nemo", tiny_sd_dir, out]) == 0
    names, config, weights = _archive(out)
    # SaveRestoreConnector._make_nemo_file_from_folder: tar "w:" of the folder as "." (588-592)
    assert names == [".", "./model_config.yaml", "./model_weights.ckpt"]
    with open(out, "rb") as f:
        assert f.read(2) != b"\x1f\x8b"  # not gzipped
    assert config["target"] == "nemo.collections.multimodal.models.text_to_image.stable_diffusion.ldm.ddpm." \
                               "MegatronLatentDiffusion"
    missing = [k for k in MODEL_PT_KEYS + DDPM_KEYS + LATENT_DIFFUSION_KEYS if k not in config]
    assert not missing
    assert "_target_" not in config  # from_config_dict would hand the whole config to hydra
    assert config["parameterization"] == "eps" and config["beta_schedule"] == "linear"  # diffusers scaled_linear
    assert (config["linear_start"], config["linear_end"], config["timesteps"]) == (0.00085, 0.012, 1000)
    assert config["scale_factor"] == 0.18215

    unet = config["unet_config"]
    assert unet["_target_"] == "nemo.collections.multimodal.modules.stable_diffusion.diffusionmodules.openaimodel." \
                               "UNetModel"
    assert all(k in unet for k in UNET_ARGS) and set(unet) - {"_target_"} <= UNET_SIGNATURE
    assert (unet["model_channels"], unet["channel_mult"], unet["num_res_blocks"], unet["attention_resolutions"],
            unet["num_heads"], unet["num_head_channels"], unet["context_dim"], unet["transformer_depth"]) == \
        (32, [1, 2], 1, [2], 8, -1, 32, 1)
    vae = config["first_stage_config"]
    assert vae["_target_"].endswith("stable_diffusion.ldm.autoencoder.AutoencoderKL")
    assert set(vae) - {"_target_"} <= VAE_SIGNATURE and set(vae["ddconfig"]) <= DDCONFIG
    assert vae["embed_dim"] == 4 and vae["ddconfig"]["ch_mult"] == [1, 1, 2, 2] and vae["ddconfig"]["double_z"]
    assert config["cond_stage_config"]["_target_"].endswith("encoders.modules.FrozenCLIPEmbedder")

    # the weights in NeMo's module tree: UNetModel names, AttnBlock 1x1 convs, CLIP, DDPM buffers
    for key in ("model.model.diffusion_model.input_blocks.1.0.in_layers.1.weight",
                "model.model.diffusion_model.out.1.weight",
                "model.model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn1.norm.weight",
                "model.model.diffusion_model.input_blocks.3.1.transformer_blocks.0.ff.net.1.proj.weight",
                "model.model.diffusion_model.input_blocks.3.1.transformer_blocks.0.ff.net.3.weight",
                "model.cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"):
        assert key in weights, key
    assert weights["model.first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_pretrained(tiny_sd_dir, subfolder="scheduler")
    assert all("model." + b in weights for b in SCHEDULE_BUFFERS)
    torch.testing.assert_close(weights["model.alphas_cumprod"], sched.alphas_cumprod, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights["model.betas"], sched.betas, rtol=1e-5, atol=1e-7)


def test_sdxl_nemo_names_the_diffusion_engine(tmp_path):
    from nemo_aligner_draft.testing.tiny_sdxl import save_tiny_sdxl

    sdxl = save_tiny_sdxl(str(tmp_path / "sdxl"))
    out = str(tmp_path / "xl.nemo")
    assert convert(["to-nemo", sdxl, out]) == 0
    _, config, weights = _archive(out)
    assert config["target"] == "nemo.collections.multimodal.models.text_to_image.stable_diffusion.diffusion_engine." \
                               "MegatronDiffusionEngine"
    assert all(k in config for k in MODEL_PT_KEYS + DIFFUSION_ENGINE_KEYS)
    unet = config["unet_config"]
    assert unet["num_classes"] == "sequential" and unet["adm_in_channels"] == 24 + 6 * 8
    assert unet["use_linear_in_transformer"] is True and unet["context_dim"] == 80
    assert set(unet) - {"_target_"} <= UNET_SIGNATURE
    assert "model.model.diffusion_model.label_emb.0.0.weight" in weights


@pytest.mark.parametrize("what", ["unet", "vae"])
def test_a_dropped_tensor_is_an_error_and_nothing_is_written(tmp_path, monkeypatch, what):
    """SDXL: a key map that loses a tensor (here: label_emb, or a VAE conv) stops the export."""
    import nemo_aligner_draft.export.to_nemo as to_nemo
    from nemo_aligner_draft.testing.tiny_sdxl import save_tiny_sdxl

    sdxl = save_tiny_sdxl(str(tmp_path / "sdxl"))
    original = getattr(to_nemo, f"{what}_to_nemo")

    def lossy(state, config, layout="ldm"):
        out = original(state, config, layout)
        return {k: v for k, v in out.items() if not k.startswith(("label_emb.0.2", "decoder.conv_out"))}

    monkeypatch.setattr(to_nemo, f"{what}_to_nemo", lossy)
    out = tmp_path / "xl.nemo"
    name = {"unet": "UNet", "vae": "VAE"}[what]
    with pytest.raises(ConversionError, match=rf"{name} export is incomplete: .*tensors in, .* written"):
        to_nemo.export_nemo(sdxl, str(out))
    assert not out.exists()
