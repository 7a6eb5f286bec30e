"""diffusers ↔ NeMo key layouts on tiny models: bit-exact round trips, agreement with diffusers' own
LDM converter (an independent reading of the CompVis layout), the HF-converter layout's distinctive
names, equal model outputs after conversion, and the error messages for mismatched checkpoints.

SDXL depth (transformer stacks of 1, 2 and 10 blocks): every tensor maps both ways in every layout,
NeMo's own names agree with NeMo's constructor (``nemo_unet_shapes``), and the default ``ldm`` layout
loses nothing under a re-enactment of NeMo's ``from_NeMo: True`` loader, which only renames CompVis
transformer names of ``transformer_blocks.0`` (the ``compvis`` layout loses blocks ≥ 1 there)."""
import re

import pytest
import torch

from nemo_aligner_draft.export.ldm_layout import (
    LAYOUTS,
    ConversionError,
    detect_unet_layout,
    unet_from_nemo,
    unet_key_map,
    unet_to_nemo,
    vae_from_nemo,
    vae_to_nemo,
)
from nemo_aligner_draft.testing import nemo_sd
from nemo_aligner_draft.testing.tiny import TINY_UNET, TINY_VAE

# an SDXL-shaped UNet: 3 levels, 2 layers per block, no attention on the first level, add_embedding
TINY_XL_UNET = dict(block_out_channels=(16, 32, 32), layers_per_block=2,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    transformer_layers_per_block=(1, 2, 2), cross_attention_dim=32, attention_head_dim=4,
                    norm_num_groups=8, sample_size=8, use_linear_projection=True,
                    addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=32 + 6 * 8)


def _unet(seed=0, **cfg):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**(cfg or TINY_UNET))


def _vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**TINY_VAE)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_unet_round_trip_is_bit_exact(layout, arch):
    unet = _unet(**(TINY_XL_UNET if arch == "sdxl" else {}))
    sd = unet.state_dict()
    nemo = unet_to_nemo(sd, unet.config, layout)
    assert len(nemo) == len(sd) and detect_unet_layout(nemo) == layout
    back = unet_from_nemo(nemo, sd, unet.config)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_compvis_export_matches_diffusers_own_ldm_converter(arch):
    """The block numbering, checked by an independent reader: diffusers' single-file (CompVis) loader."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = _unet(**(TINY_XL_UNET if arch == "sdxl" else {}))
    sd = unet.state_dict()
    ldm = {"model.diffusion_model." + k: v for k, v in unet_to_nemo(sd, unet.config, "compvis").items()}
    ref = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(ref) == set(sd)
    assert all(torch.equal(ref[k], sd[k]) for k in sd)


def test_nemo_hf_layout_names():
    """Facts from NeMo's HF→NeMo converter: resnet convs at in_layers.1/out_layers.2, final conv out.1,
    transformer norms under attn1.norm/attn2.norm/ff.net.0, feed-forward at ff.net.1.proj/ff.net.3."""
    unet = _unet()
    m = unet_key_map(unet.state_dict().keys(), unet.config, "nemo_hf")
    assert m["down_blocks.0.resnets.0.conv1.weight"] == "input_blocks.1.0.in_layers.1.weight"
    assert m["down_blocks.0.resnets.0.conv2.weight"] == "input_blocks.1.0.out_layers.2.weight"
    assert m["conv_out.weight"] == "out.1.weight"
    tb = "down_blocks.1.attentions.0.transformer_blocks.0."
    assert m[tb + "norm1.weight"] == "input_blocks.3.1.transformer_blocks.0.attn1.norm.weight"
    assert m[tb + "norm3.weight"] == "input_blocks.3.1.transformer_blocks.0.ff.net.0.weight"
    assert m[tb + "ff.net.0.proj.weight"] == "input_blocks.3.1.transformer_blocks.0.ff.net.1.proj.weight"
    assert m[tb + "ff.net.2.weight"] == "input_blocks.3.1.transformer_blocks.0.ff.net.3.weight"
    assert m["down_blocks.0.downsamplers.0.conv.weight"] == "input_blocks.2.0.op.weight"
    assert m["up_blocks.0.upsamplers.0.conv.weight"] == "output_blocks.1.2.conv.weight"  # after attention (1 layer per block + 1)
    ldm = unet_key_map(unet.state_dict().keys(), unet.config, "ldm")
    assert ldm["down_blocks.0.resnets.0.conv1.weight"] == "input_blocks.1.0.in_layers.2.weight"
    assert ldm["conv_out.weight"] == "out.2.weight"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_converted_unet_gives_the_same_output(layout):
    original = _unet(seed=0)
    target = _unet(seed=1)  # different random weights: the conversion must overwrite every tensor
    nemo = unet_to_nemo(original.state_dict(), original.config, layout)
    target.load_state_dict(unet_from_nemo(nemo, target.state_dict(), target.config), strict=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        a = original(x, 10, encoder_hidden_states=ctx).sample
        b = target(x, 10, encoder_hidden_states=ctx).sample
        c = _unet(seed=1)(x, 10, encoder_hidden_states=ctx).sample
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3  # the comparison can tell two different UNets apart


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vae_round_trip_and_output(layout):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae, target = _vae(0), _vae(1)
    sd = vae.state_dict()
    nemo = vae_to_nemo(sd, vae.config, layout)
    attn_q = nemo["decoder.mid.attn_1.q.weight"]
    assert attn_q.ndim == (2 if layout == "nemo_hf" else 4)  # LDM stores 1×1 convs, NeMo's converter linears
    back = vae_from_nemo(nemo, sd, vae.config)
    assert all(torch.equal(back[k], sd[k]) for k in sd) and set(back) == set(sd)
    if layout != "nemo_hf":
        ref = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in nemo.items()}, dict(vae.config))
        assert set(ref) == set(sd) and all(torch.equal(ref[k].reshape(sd[k].shape), sd[k]) for k in sd)
    target.load_state_dict(back, strict=True)
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(vae.decode(z).sample, target.decode(z).sample)


def test_missing_and_unexpected_keys_are_listed():
    unet = _unet()
    nemo = unet_to_nemo(unet.state_dict(), unet.config, "ldm")
    nemo.pop("middle_block.1.proj_in.weight")
    nemo["middle_block.7.foo.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError) as e:
        unet_from_nemo(nemo, unet.state_dict(), unet.config)
    msg = str(e.value)
    assert "1 missing keys" in msg and "middle_block.1.proj_in.weight" in msg
    assert "1 unexpected keys" in msg and "middle_block.7.foo.weight" in msg


def test_wrong_architecture_lists_shape_mismatches():
    small = _unet()
    wide = _unet(**{**TINY_UNET, "block_out_channels": (32, 96)})
    nemo = unet_to_nemo(wide.state_dict(), wide.config, "ldm")
    with pytest.raises(ConversionError) as e:
        unet_from_nemo(nemo, small.state_dict(), small.config)
    msg = str(e.value)
    assert "shape mismatches" in msg and "vs expected" in msg
    n = int(msg.split(" shape mismatches")[0].rsplit(" ", 1)[-1])
    assert n > 10 and msg.count("vs expected") == 10  # a count plus the first ten


# --------------------------------------------------------------------------- SDXL depth: every tensor, both ways
# SDXL's shape at width 32: 3 levels, 2 res blocks, attention at levels 1 and 2 with stacks of 2 and 10
# transformer blocks, linear projections, the text_time added embedding — and NeMo's unet_config of it
DEEP_XL_UNET = dict(block_out_channels=(32, 32, 32), layers_per_block=2,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=32, attention_head_dim=2,
                    norm_num_groups=32, sample_size=8, use_linear_projection=True,
                    addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=80)
DEEP_XL_NEMO = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 1, 1], num_res_blocks=2,
                    attention_resolutions=[4, 2], num_head_channels=16, use_spatial_transformer=True,
                    use_linear_in_transformer=True, transformer_depth=[1, 2, 10], context_dim=32,
                    num_classes="sequential", adm_in_channels=80, legacy=False)
_COMPVIS_NAME = re.compile(r"\.transformer_blocks\.(\d+)\.(norm[123]|ff\.net\.0\.proj|ff\.net\.2)\.")


@pytest.fixture(scope="module")
def deep_xl():
    return _unet(**DEEP_XL_UNET)


def test_deep_sdxl_config_is_what_nemo_parts_derives(deep_xl):
    from nemo_aligner_draft.backends.nemo_parts import diffusers_unet_config

    derived = _unet(**diffusers_unet_config(DEEP_XL_NEMO, sample_size=8, addition_time_embed_dim=8))
    assert {k: v.shape for k, v in derived.state_dict().items()} == {k: v.shape for k, v in deep_xl.state_dict().items()}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_tensor_of_a_depth_10_sdxl_unet_maps_both_ways(deep_xl, layout):
    sd = deep_xl.state_dict()
    nemo = unet_to_nemo(sd, deep_xl.config, layout)
    assert len(nemo) == len(sd)
    # 10-block stacks: 2 down, 1 middle, 3 up; 20 tensors a block (attn1, attn2: q k v out.w out.b norm.w norm.b; ff 6)
    assert sum(".transformer_blocks.9." in k for k in nemo) == 6 * 20
    back = unet_from_nemo(nemo, sd, deep_xl.config, layout)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    assert unet_from_nemo(nemo, sd, deep_xl.config).keys() == sd.keys()  # layout detected


def test_nemo_hf_names_are_nemos_constructor_names(deep_xl):
    shapes = nemo_sd.nemo_unet_shapes(DEEP_XL_NEMO)
    nemo = unet_to_nemo(deep_xl.state_dict(), deep_xl.config, "nemo_hf")
    assert {k: tuple(v.shape) for k, v in nemo.items()} == shapes


def test_ldm_layout_loads_every_tensor_in_nemo_where_compvis_loses_deep_blocks(deep_xl):
    sd = deep_xl.state_dict()
    ldm = unet_to_nemo(sd, deep_xl.config, "ldm")
    assert not any(_COMPVIS_NAME.search(k) for k in ldm)  # NeMo's names in every block
    prefixed = {"model.model.diffusion_model." + k: v for k, v in ldm.items()}
    missing, unexpected = nemo_sd.simulate_nemo_unet_load(prefixed, DEEP_XL_NEMO)
    shifted = re.compile(r"\.(in_layers\.2|out_layers\.3)\.|^out\.2\.")  # copied onto NeMo's indices, left behind
    assert missing == [] and unexpected and all(shifted.search(k) for k in unexpected)
    # the issue: NeMo renames CompVis transformer names of transformer_blocks.0 only
    missing, unexpected = nemo_sd.simulate_nemo_unet_load(unet_to_nemo(sd, deep_xl.config, "compvis"), DEEP_XL_NEMO)
    assert missing and len(missing) == len([k for k in unexpected if not shifted.search(k)])
    blocks = {int(re.search(r"transformer_blocks\.(\d+)\.", k)[1]) for k in missing}
    assert blocks == set(range(1, 10))
    assert all(re.search(r"\.(attn[12]\.norm|ff\.net\.(0|1\.proj|3))\.", k) for k in missing)


def test_a_missing_deep_tensor_is_an_error(deep_xl):
    sd = deep_xl.state_dict()
    nemo = unet_to_nemo(sd, deep_xl.config, "ldm")
    gone = next(k for k in nemo if ".transformer_blocks.7.ff.net.3.weight" in k)
    del nemo[gone]
    with pytest.raises(ConversionError, match=rf"1 missing keys, e\.g\. \['{re.escape(gone)}'\]"):
        unet_from_nemo(nemo, sd, deep_xl.config)


def test_an_unmapped_tensor_is_an_error_on_export(deep_xl):
    sd = dict(deep_xl.state_dict())
    sd["down_blocks.2.attentions.0.transformer_blocks.3.attn1.norm_q.weight"] = torch.zeros(16)
    with pytest.raises(ConversionError, match=r"1 UNet keys have no NeMo equivalent.*norm_q"):
        unet_to_nemo(sd, deep_xl.config, "ldm")
    with pytest.raises(ConversionError, match="unexpected keys"):  # and an extra NeMo tensor on import
        nemo = unet_to_nemo(deep_xl.state_dict(), deep_xl.config, "ldm")
        nemo["input_blocks.4.1.transformer_blocks.2.attn1.norm.weight"] = torch.zeros(32)
        unet_from_nemo(nemo, deep_xl.state_dict(), deep_xl.config)


def test_reading_accepts_either_transformer_spelling_but_not_both(deep_xl):
    """An older export (CompVis names in every block, in_layers.2) and NeMo's own mixed output (block 0
    renamed, the rest not) read to the same tensors; a tensor under both names is an error."""
    sd = deep_xl.state_dict()
    compvis = unet_to_nemo(sd, deep_xl.config, "compvis")
    ldm = unet_to_nemo(sd, deep_xl.config, "ldm")
    mixed = {k: v for k, v in ldm.items() if ".transformer_blocks.0." in k}
    mixed.update({k: v for k, v in compvis.items() if ".transformer_blocks.0." not in k})
    for state in (compvis, mixed):
        back = unet_from_nemo(state, sd, deep_xl.config, "ldm")
        assert all(torch.equal(back[k], sd[k]) for k in sd)
    doubled = dict(ldm)
    k = next(k for k in compvis if ".transformer_blocks.5.norm3.weight" in k)
    doubled[k] = compvis[k]
    with pytest.raises(ConversionError, match="1 tensors present under two names"):
        unet_from_nemo(doubled, sd, deep_xl.config)


def test_per_level_res_blocks_map_like_nemos_constructor():
    from nemo_aligner_draft.backends.nemo_parts import diffusers_unet_config

    nemo_cfg = dict(DEEP_XL_NEMO, num_res_blocks=[1, 2, 3], transformer_depth=[1, 2, 3])
    unet = _unet(**diffusers_unet_config(nemo_cfg, sample_size=8, addition_time_embed_dim=8))
    nemo = unet_to_nemo(unet.state_dict(), unet.config, "nemo_hf")
    assert {k: tuple(v.shape) for k, v in nemo.items()} == nemo_sd.nemo_unet_shapes(nemo_cfg)
    back = unet_from_nemo(nemo, unet.state_dict(), unet.config)
    assert all(torch.equal(back[k], v) for k, v in unet.state_dict().items())
