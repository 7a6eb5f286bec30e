"""A backend from NeMo-Aligner's ``model`` section (UNet / VAE / text-encoder parts named on the command
line, no pipeline directory), on tiny random parts written in NeMo's on-disk layouts.

References: diffusers' own ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` built from the same
diffusers modules *before* they are written in NeMo's layout (sampling), NeMo's schedule formulas
re-written here from ``ddpm.py`` / ``discretizer.py`` (schedules), open_clip's own text tower (the
open_clip checkpoint), and diffusers' published SD 1.5 / SDXL UNet configs (config derivation).
"""
import copy
import json
import re

import numpy as np
import pytest
import torch

from nemo_aligner_draft.backends.nemo_parts import (diffusers_unet_config, diffusers_vae_config, load_nemo_parts_backend,
                                                    nemo_family)
from nemo_aligner_draft.backends.sd import SDBackend
from nemo_aligner_draft.backends.sdxl import SDXLBackend
from nemo_aligner_draft.core.sampler import StepPlan, sample
from nemo_aligner_draft.testing import nemo_sd

PROMPTS = ["a red fox in the snow", "an astronaut riding a horse"]
STEPS = 4


def _sample(backend, noise, cfg, steps=STEPS):
    rule = backend.step_rule(steps)
    with torch.no_grad():
        return sample(backend.denoiser(backend.encode_prompts(PROMPTS), cfg), rule, noise * rule.init_noise_sigma(),
                      StepPlan.no_grad(steps)).latents


# ============================================================================ SD
@pytest.fixture(scope="module")
def sd_parts(tmp_path_factory):
    """The tiny modules, the diffusers reference pipeline built from them first, then the modules written
    in NeMo's layouts: from_NeMo True (NeMo checkpoints) and False (HF files)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    modules = nemo_sd.build_tiny_sd_modules(seed=0)
    # NeMo's SD schedule in diffusers' words: ddpm.py "linear" = linspace(√0.00085, √0.012)², the DDIM
    # sampler's "uniform" steps + 1, ᾱ_prev of the last step = ᾱ_0
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=modules["unet"], vae=modules["vae"], text_encoder=modules["text_encoder"],
                                   tokenizer=modules["tokenizer"], scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    root = tmp_path_factory.mktemp("nemo_sd")
    sections = {flag: nemo_sd.write_tiny_nemo_sd(modules, str(root / f"from_nemo_{flag}"), from_NeMo=flag)
                for flag in (True, False)}
    return dict(modules=modules, pipe=pipe, sections=sections, root=root)


@pytest.mark.parametrize("from_nemo", [True, False])
def test_sd_parts_sample_what_diffusers_samples(sd_parts, from_nemo):
    backend = load_nemo_parts_backend(sd_parts["sections"][from_nemo])
    assert type(backend) is SDBackend and backend.family_spec.name == "sd" and backend.default_sampler == "ddim"
    noise = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = _sample(backend, noise, 7.5)
    with torch.no_grad():
        theirs = sd_parts["pipe"](PROMPTS, height=64, width=64, latents=noise.clone(), output_type="latent", eta=0.0,
                                  guidance_scale=7.5, num_inference_steps=STEPS).images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    vae = sd_parts["modules"]["vae"]
    with torch.no_grad():
        ref = (vae.decode(ours / 0.18215).sample / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(backend.decode(ours), ref, rtol=0, atol=1e-5)
    # every tensor came from the files: bit-equal to the modules they were written from
    for name, module in (("unet", backend.unet), ("vae", backend.vae)):
        want = sd_parts["modules"][name].state_dict()
        got = module.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in got), name


def test_sd_nemo_checkpoint_variants_load_the_same_weights(sd_parts, tmp_path):
    """NeMo's loader strips model.diffusion_model. / model.model.diffusion_model. (or nothing), unwraps
    a state_dict entry, and reads CompVis-indexed files: so do we, to the same tensors."""
    unet = sd_parts["modules"]["unet"]
    base = sd_parts["sections"][True]
    want = unet.state_dict()
    for i, (layout, prefix, entry) in enumerate([("nemo_hf", "", False), ("ldm", "model.diffusion_model.", True),
                                                 ("compvis", "model.diffusion_model.", True),
                                                 ("ldm", "model.model.diffusion_model.", False)]):
        path = nemo_sd.write_nemo_unet(unet, str(tmp_path / f"u{i}.ckpt"), nemo_sd.TINY_NEMO_UNET, layout=layout,
                                       prefix=prefix, state_dict_entry=entry)
        section = copy.deepcopy(base)
        section["unet_config"]["from_pretrained"] = path
        got = load_nemo_parts_backend(section).unet.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), (layout, prefix)


@pytest.mark.parametrize("nemo_cfg, diffusers_cfg, time_dim", [
    (nemo_sd.TINY_NEMO_UNET, nemo_sd.TINY_DIFFUSERS_UNET, 256),
    (nemo_sd.TINY_NEMO_SDXL_UNET, nemo_sd.TINY_DIFFUSERS_SDXL_UNET, nemo_sd.TIME_EMBED_DIM)], ids=["sd", "sdxl"])
def test_config_derivation_of_the_tiny_unets(nemo_cfg, diffusers_cfg, time_dim):
    """The hand-written diffusers configs of the tiny parts are what the derivation gives."""
    derived = diffusers_unet_config(nemo_cfg, sample_size=8, addition_time_embed_dim=time_dim)
    assert {k: derived[k] for k in diffusers_cfg} == diffusers_cfg


# ============================================================================ SDXL
@pytest.fixture(scope="module")
def sdxl_parts(tmp_path_factory):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    modules = nemo_sd.build_tiny_sdxl_modules(seed=0)
    # NeMo's LegacyDDPMDiscretization: σ of the scaled-linear ᾱ at floor(linspace(999, 0, n, endpoint=False))
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", timestep_spacing="trailing")
    pipe = StableDiffusionXLPipeline(vae=modules["vae"], text_encoder=modules["text_encoder"],
                                     text_encoder_2=modules["text_encoder_2"], tokenizer=modules["tokenizer"],
                                     tokenizer_2=modules["tokenizer_2"], unet=modules["unet"], scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    root = tmp_path_factory.mktemp("nemo_sdxl")
    sections = {flag: nemo_sd.write_tiny_nemo_sdxl(modules, str(root / f"from_nemo_{flag}"), from_NeMo=flag)
                for flag in (True, False)}
    return dict(modules=modules, pipe=pipe, sections=sections, root=root)


@pytest.mark.parametrize("from_nemo", [True, False])
def test_sdxl_parts_sample_what_diffusers_samples(sdxl_parts, from_nemo):
    backend = load_nemo_parts_backend(sdxl_parts["sections"][from_nemo])
    assert type(backend) is SDXLBackend and backend.default_sampler == "euler"
    assert backend.time_ids == (64, 64, 0, 0, 64, 64)  # model.sampling.base height/width
    assert backend.vae.config.force_upcast and backend.force_zeros_for_empty_prompt
    noise = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = _sample(backend, noise, 5.0)
    with torch.no_grad():
        theirs = sdxl_parts["pipe"](PROMPTS, height=64, width=64, latents=noise.clone(), output_type="latent",
                                    guidance_scale=5.0, num_inference_steps=STEPS).images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    for name, module in (("unet", backend.unet), ("vae", backend.vae)):
        want = sdxl_parts["modules"][name].state_dict()
        got = module.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in got), name


@pytest.mark.parametrize("layout", ["ldm", "nemo_hf", "compvis"])
def test_sdxl_unet_every_tensor_both_ways_and_through_the_loader(sdxl_parts, tmp_path, layout):
    """Transformer stacks of 2 blocks: blocks ≥ 1 map both ways in every layout, the file loads to the
    same tensors, and a block-1 tensor taken out is an error naming it."""
    from nemo_aligner_draft.export.ldm_layout import ConversionError, unet_from_nemo, unet_to_nemo

    unet = sdxl_parts["modules"]["unet"]
    sd = unet.state_dict()
    nemo = unet_to_nemo(sd, unet.config, layout)
    assert len(nemo) == len(sd) and any(".transformer_blocks.1." in k for k in nemo)
    back = unet_from_nemo(nemo, sd, unet.config)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    path = nemo_sd.write_nemo_unet(unet, str(tmp_path / "unet.ckpt"), nemo_sd.TINY_NEMO_SDXL_UNET, layout=layout)
    section = _with(sdxl_parts["sections"][True], "unet_config", from_pretrained=path)
    got = load_nemo_parts_backend(section).unet.state_dict()
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    gone = next(k for k in nemo if ".transformer_blocks.1." in k and k.endswith(("ff.net.3.weight", "ff.net.2.weight")))
    del nemo[gone]
    with pytest.raises(ConversionError, match=re.escape(gone)):
        unet_from_nemo(nemo, sd, unet.config)


def test_an_omegaconf_section_loads_like_a_dict(sd_parts):
    """The shell may hand over Hydra's DictConfig (with interpolations) instead of a plain dict."""
    from omegaconf import OmegaConf

    section = copy.deepcopy(sd_parts["sections"][True])
    section["unet_config"]["context_dim"] = "${..cond_width}"
    section["cond_width"] = 32
    section["unet_config"]["from_NeMo"] = "True"  # as a command-line override may give it
    backend = load_nemo_parts_backend(OmegaConf.create(section))
    assert backend.unet.config.cross_attention_dim == 32


def test_sdxl_open_clip_checkpoint_as_text_encoder_2(sdxl_parts, tmp_path):
    """``FrozenOpenCLIPEmbedder2.version`` as an open_clip checkpoint file: the converted encoder gives
    open_clip's own penultimate hidden states and pooled projection, with open_clip.tokenize's ids."""
    import open_clip

    ckpt = str(tmp_path / "open_clip_pytorch_model.bin")
    oc = nemo_sd.write_open_clip_checkpoint(ckpt)
    arch_dir = tmp_path / "arch"
    arch_dir.mkdir()
    (arch_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": nemo_sd.TINY_OPEN_CLIP}))
    section = copy.deepcopy(sdxl_parts["sections"][True])
    emb = section["conditioner_config"]["emb_models"][1]["emb_model"]
    emb.update(version=ckpt, arch=f"local-dir:{arch_dir}")
    backend = load_nemo_parts_backend(section)
    te2, tok2 = backend.text_encoders[1], backend.tokenizers[1]
    tokens = open_clip.tokenize(PROMPTS + [""])
    ids = tok2(PROMPTS + [""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, tokens)
    with torch.no_grad():
        # encoders/modules.py FrozenOpenCLIPEmbedder2: the input of the last residual block, and ln_final
        # of the last output at the end-of-text token times text_projection
        x = oc.token_embedding(tokens) + oc.positional_embedding
        for block in oc.transformer.resblocks[:-1]:
            x = block(x, attn_mask=oc.attn_mask)
        penultimate = x
        last = oc.ln_final(oc.transformer.resblocks[-1](x, attn_mask=oc.attn_mask))
        pooled = last[torch.arange(len(tokens)), tokens.argmax(dim=-1)] @ oc.text_projection
        out = te2(ids, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[-2], penultimate, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.text_embeds, pooled, rtol=1e-4, atol=1e-5)
    assert backend.encode_prompts(PROMPTS).cond["added_cond_kwargs"]["text_embeds"].shape == (2, 24)


# ============================================================================ config derivation
# NeMo-Aligner examples/mm/stable_diffusion/conf/draftp_sd.yaml, model.unet_config
DRAFTP_SD_UNET = dict(from_pretrained=None, from_NeMo=True, image_size=32, in_channels=4, out_channels=4,
                      model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4],
                      num_heads=8, use_spatial_transformer=True, transformer_depth=1, context_dim=768,
                      use_checkpoint=False, legacy=False, use_flash_attention=False, resblock_gn_groups=32,
                      lora_network_alpha=None)
# NeMo-Aligner examples/mm/stable_diffusion/conf/draftp_sdxl.yaml, model.unet_config
DRAFTP_SDXL_UNET = dict(from_NeMo=True, from_pretrained=None, adm_in_channels=2816, num_classes="sequential",
                        use_checkpoint=False, in_channels=4, out_channels=4, model_channels=320,
                        attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=64,
                        use_spatial_transformer=True, use_linear_in_transformer=True, transformer_depth=[1, 2, 10],
                        context_dim=2048, image_size=64, legacy=False, use_flash_attention=True)
# diffusers' published runwayml/stable-diffusion-v1-5 unet/config.json (diffusers 0.6.0)
SD15_UNET_CONFIG = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
# diffusers' published stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (diffusers 0.19.0.dev0)
SDXL_UNET_CONFIG = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True}


def _init_dict(config):
    """diffusers' full constructor arguments (its defaults filled in), JSON-normalised (tuples → lists)."""
    import inspect

    from diffusers import UNet2DConditionModel

    init, _, _ = UNet2DConditionModel.extract_init_dict(dict(config))
    defaults = {k: p.default for k, p in inspect.signature(UNet2DConditionModel.__init__).parameters.items()
                if k != "self" and p.default is not inspect.Parameter.empty}
    return json.loads(json.dumps({**defaults, **init}))


@pytest.mark.parametrize("unet_config, sample_size, published", [
    (DRAFTP_SD_UNET, 64, SD15_UNET_CONFIG),  # model.image_size: 64 in draftp_sd.yaml
    (DRAFTP_SDXL_UNET, 1024 // 8, SDXL_UNET_CONFIG),  # sampling.base 1024 px / the VAE's 8
], ids=["sd15", "sdxl"])
def test_unet_config_of_draftp_yaml_is_diffusers_published_config(unet_config, sample_size, published):
    derived = diffusers_unet_config(unet_config, sample_size=sample_size)
    expected = _init_dict(published)
    # SDXL's file says upcast_attention null, diffusers' default is false: Attention treats both alike
    expected["upcast_attention"] = bool(expected["upcast_attention"])
    assert _init_dict(derived) == expected


def test_vae_config_of_draftp_yaml_is_sd_vae_config():
    # draftp_sd.yaml / draftp_sdxl.yaml model.first_stage_config; diffusers' SD 1.5 / SDXL vae/config.json
    first_stage = dict(embed_dim=4, ddconfig=dict(double_z=True, z_channels=4, resolution=256, in_channels=3,
                                                  out_ch=3, ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2,
                                                  attn_resolutions=[], dropout=0.0))
    cfg = diffusers_vae_config(first_stage, scale_factor=0.13025, force_upcast=True)
    assert cfg["block_out_channels"] == (128, 256, 512, 512) and cfg["layers_per_block"] == 2
    assert cfg["latent_channels"] == 4 and cfg["norm_num_groups"] == 32 and cfg["act_fn"] == "silu"
    assert cfg["down_block_types"] == ("DownEncoderBlock2D",) * 4 and cfg["up_block_types"] == ("UpDecoderBlock2D",) * 4
    assert cfg["scaling_factor"] == 0.13025 and cfg["force_upcast"]


# ============================================================================ schedules
def _nemo_alphas_cumprod(start, end, n):
    """ddpm.py register_schedule with util.py make_beta_schedule("linear")."""
    betas = np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


@pytest.mark.parametrize("steps", [4, 50])
def test_sd_schedule_is_nemos(sd_parts, steps):
    backend = load_nemo_parts_backend(sd_parts["sections"][True])
    ac = _nemo_alphas_cumprod(0.00085, 0.012, 1000)
    np.testing.assert_allclose(backend.scheduler.alphas_cumprod.double().numpy(), ac, rtol=1e-6)
    # util.py make_ddim_timesteps("uniform"): range(0, 1000, 1000 // n) + 1
    rule = backend.step_rule(steps)
    assert rule.timesteps.tolist() == (np.arange(0, 1000, 1000 // steps) + 1)[::-1].tolist()
    assert rule.final_alpha_cumprod == pytest.approx(float(ac[0]), rel=1e-6)


@pytest.mark.parametrize("steps", [4, 25, 40, 50])
def test_sdxl_schedule_is_nemos_legacy_ddpm_discretization(sdxl_parts, steps):
    """discretizer.py LegacyDDPMDiscretization: σ = √((1−ᾱ)/ᾱ) at floor(linspace(999, 0, n, endpoint=False)),
    flipped, a final 0. diffusers' "trailing" rounds instead of flooring: equal for these n (NeMo-Aligner's
    40 included), one timestep apart at some steps for others (e.g. n = 3)."""
    backend = load_nemo_parts_backend(sdxl_parts["sections"][True])
    ac = _nemo_alphas_cumprod(0.00085, 0.012, 1000)
    t = np.linspace(999, 0, steps, endpoint=False).astype(int)[::-1]
    sigmas = np.flip(((1 - ac[t]) / ac[t]) ** 0.5)
    rule = backend.step_rule(steps)
    assert rule.timesteps.round().long().tolist() == np.flip(t).tolist()
    np.testing.assert_allclose(rule.sigmas.double().numpy(), np.append(sigmas, 0.0), rtol=1e-5)


def test_v_parameterization_and_schedule_keys(sd_parts, sdxl_parts):
    section = copy.deepcopy(sd_parts["sections"][True])
    section.update(parameterization="v", beta_schedule="sqrt_linear")
    backend = load_nemo_parts_backend(section)
    assert backend.scheduler.config.prediction_type == "v_prediction"
    np.testing.assert_allclose(backend.scheduler.betas.double().numpy(), np.linspace(0.00085, 0.012, 1000), rtol=1e-5)
    xl = copy.deepcopy(sdxl_parts["sections"][True])
    xl["denoiser_config"]["scaling_config"]["_target_"] = "x.denoiser_scaling.VScaling"
    assert load_nemo_parts_backend(xl).scheduler.config.prediction_type == "v_prediction"
    for bad, key in ((dict(parameterization="x0"), "model.parameterization"),
                     (dict(beta_schedule="sqrt"), "model.beta_schedule")):
        with pytest.raises(ValueError, match=key):
            load_nemo_parts_backend({**sd_parts["sections"][True], **bad})


# ============================================================================ family rule
def test_family_rule():
    assert nemo_family({"cond_stage_config": {}, "unet_config": {}}) == "sd"
    assert nemo_family({"conditioner_config": {}, "unet_config": {}}) == "sdxl"
    assert nemo_family({"cond_stage_config": {}, "unet_config": {"adm_in_channels": 2816}}) == "sdxl"
    with pytest.raises(ValueError, match="cannot tell the model family"):
        nemo_family({"unet_config": {}})


# ============================================================================ errors
def _with(section, part, **changes):
    s = copy.deepcopy(section)
    s[part].update(changes)
    return s


def test_checkpoint_not_fitting_unet_config_is_one_error_naming_the_key(sd_parts):
    section = _with(sd_parts["sections"][True], "unet_config", channel_mult=[1, 3])
    with pytest.raises(ValueError) as e:
        load_nemo_parts_backend(section)
    msg = str(e.value)
    assert msg.startswith("model.unet_config.from_pretrained:")
    assert "shape mismatches" in msg and "vs expected" in msg and "input_blocks.3.0.in_layers.1.weight" in msg
    # the HF path says the same
    with pytest.raises(ValueError, match=r"^model\.unet_config\.from_pretrained:.*shape mismatches"):
        load_nemo_parts_backend(_with(sd_parts["sections"][False], "unet_config", channel_mult=[1, 3]))


def test_missing_tensor_is_an_error_naming_it(sd_parts, tmp_path):
    path = sd_parts["sections"][True]["unet_config"]["from_pretrained"]
    state = nemo_sd.nemo_state(path)
    dropped = "model.model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.3.weight"
    del state[dropped]
    section = _with(sd_parts["sections"][True], "unet_config",
                    from_pretrained=nemo_sd.rewrite(path, state, str(tmp_path / "missing.ckpt")))
    with pytest.raises(ValueError, match=r"^model\.unet_config\.from_pretrained:.*1 missing keys.*ff\.net\.3\.weight"):
        load_nemo_parts_backend(section)


@pytest.mark.parametrize("part, key", [("unet_config", "model.unet_config.from_pretrained"),
                                       ("first_stage_config", "model.first_stage_config.from_pretrained")])
def test_missing_file_names_the_key(sd_parts, tmp_path, part, key):
    section = _with(sd_parts["sections"][True], part, from_pretrained=str(tmp_path / "nowhere.ckpt"))
    with pytest.raises(FileNotFoundError, match=rf"^{key}: .*nowhere\.ckpt' does not exist"):
        load_nemo_parts_backend(section)


def test_text_encoder_path_that_is_not_a_directory(sd_parts, tmp_path, monkeypatch):
    a_file = tmp_path / "clip.bin"
    a_file.write_bytes(b"x")
    section = _with(sd_parts["sections"][True], "cond_stage_config", version=str(a_file))
    with pytest.raises(ValueError, match=r"^model\.cond_stage_config\.version: .* is not a directory"):
        load_nemo_parts_backend(section)
    # a Hub id is looked up in the local Hugging Face cache only (an empty one here): never downloaded
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    section = _with(sd_parts["sections"][True], "cond_stage_config", version="openai/clip-vit-large-patch14")
    with pytest.raises(FileNotFoundError, match=r"^model\.cond_stage_config\.version: .*neither a local directory "
                                                r"nor a Hugging Face id in the local cache"):
        load_nemo_parts_backend(section)


def test_sdxl_text_encoder_1_path_that_is_not_a_directory(sdxl_parts, tmp_path):
    a_file = tmp_path / "clip_l.safetensors"
    a_file.write_bytes(b"x")
    section = copy.deepcopy(sdxl_parts["sections"][True])
    section["conditioner_config"]["emb_models"][0]["emb_model"]["version"] = str(a_file)
    with pytest.raises(ValueError, match=r"^model\.conditioner_config\.emb_models\[0\]\.emb_model\.version: .* is not "
                                         r"a directory"):
        load_nemo_parts_backend(section)


def test_from_nemo_flag_that_contradicts_the_file(sd_parts):
    hf = sd_parts["sections"][False]
    with pytest.raises(ValueError, match=r"^model\.unet_config\.from_pretrained: .*diffusers/HF UNet.*from_NeMo=False"):
        load_nemo_parts_backend(_with(hf, "unet_config", from_NeMo=True))
    with pytest.raises(ValueError, match=r"^model\.first_stage_config\.from_pretrained: .*from_NeMo=False"):
        load_nemo_parts_backend(_with(hf, "first_stage_config", from_NeMo=True))
    nemo = sd_parts["sections"][True]
    with pytest.raises(ValueError, match=r"^model\.unet_config\.from_pretrained: .*NeMo/LDM UNet.*from_NeMo=True"):
        load_nemo_parts_backend(_with(nemo, "unet_config", from_NeMo=False))


def test_unsupported_unet_settings_name_their_key():
    for change, key in ((dict(use_spatial_transformer=False), "use_spatial_transformer"),
                        (dict(resblock_gn_groups=16), "resblock_gn_groups"),
                        (dict(num_heads=3), "model.unet_config"),
                        (dict(use_scale_shift_norm=True), "use_scale_shift_norm"),
                        (dict(num_classes="continuous"), "num_classes")):
        with pytest.raises(ValueError, match=rf"^model\.unet_config[.:].*{key}" if "." not in key else rf"^{key}"):
            diffusers_unet_config({**nemo_sd.TINY_NEMO_UNET, **change})


def test_sdxl_wrong_text_layer_and_adm_name_their_keys(sdxl_parts):
    section = copy.deepcopy(sdxl_parts["sections"][True])
    section["conditioner_config"]["emb_models"][0]["emb_model"]["layer_idx"] = 11  # ViT-L's, not this 2-layer one
    with pytest.raises(ValueError, match=r"^model\.conditioner_config\.emb_models\[0\]\.emb_model\.layer: .*penultimate"):
        load_nemo_parts_backend(section)
    section = _with(sdxl_parts["sections"][True], "unet_config", adm_in_channels=2816)
    with pytest.raises(ValueError, match=r"^model\.unet_config\.adm_in_channels: 2816"):
        load_nemo_parts_backend(section)
