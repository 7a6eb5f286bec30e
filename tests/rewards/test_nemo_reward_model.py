"""``nemo_clip``: NeMo-Aligner's CLIP reward model ``.nemo`` loaded natively and differentiably.

The reference in this file is built without the package's mapping: the test reads the tar and the
weights itself, un-fuses ``query_key_value`` with a per-head loop, loads a transformers ``CLIPModel`` by
explicit key names, preprocesses with torchvision exactly as NeMo-Aligner's ``diff_preprocess`` does
(on images in [0, 255], H×W×C permuted, as ``megatron_sd_draftp_model.py`` hands them over), tokenizes as
NeMo's ``tokenize`` does and scores with NeMo-Aligner's formula
``logit_scale.exp() * (normalize(img) @ normalize(txt).T).diag()`` (``image_text_rms.py`` lines 63-72).

Literal names in the layout test come from NeMo v2.1.0 and NeMo-Aligner's final commit; each is cited.
"""
import io
import os
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from nemo_aligner_draft.errors import InputError, attributed
from nemo_aligner_draft.rewards import REWARDS, build_reward
from nemo_aligner_draft.rewards.nemo_rm import load_nemo_reward_model
from nemo_aligner_draft.testing.nemo_rm import (
    TINY_NEMO_RM,
    save_tiny_nemo_reward_model,
    tiny_nemo_rm_config,
    tiny_nemo_rm_state_dict,
    write_nemo,
)
from nemo_aligner_draft.testing.tiny import clip_tokenizer

PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon, digital art",
           "x " * 100]  # the last one is longer than the 77-token context
LAYOUTS = {"legacy": True, "per_head": False}  # megatron_legacy of both towers


@pytest.fixture(scope="module")
def nemo_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("nemo_rm")
    return {name: save_tiny_nemo_reward_model(str(d / f"rm_{name}.nemo"), seed=i, megatron_legacy=legacy)
            for i, (name, legacy) in enumerate(LAYOUTS.items())}


@pytest.fixture(scope="module")
def rewards(nemo_files):
    return {name: build_reward("nemo_clip", path=p) for name, p in nemo_files.items()}


# --------------------------------------------------------------------------- the test's own reference
def read_nemo_plainly(path):
    """The config and the weights, read with tarfile + yaml + torch.load(weights_only=True) only."""
    with tarfile.open(path, "r:") as tar:
        config = yaml.safe_load(tar.extractfile("./model_config.yaml").read())
        weights = torch.load(io.BytesIO(tar.extractfile("./model_weights.ckpt").read()), weights_only=True)
    return config, weights


def unfuse_qkv_slowly(fused, heads, legacy):
    """Per-head loop. megatron_legacy: rows are [q heads | k heads | v heads]; else per head [q_h | k_h | v_h]."""
    hidden = fused.shape[0] // 3
    hn = hidden // heads
    q, k, v = [], [], []
    for h in range(heads):
        if legacy:
            q.append(fused[0 * hidden + h * hn: 0 * hidden + (h + 1) * hn])
            k.append(fused[1 * hidden + h * hn: 1 * hidden + (h + 1) * hn])
            v.append(fused[2 * hidden + h * hn: 2 * hidden + (h + 1) * hn])
        else:
            base = h * 3 * hn
            q.append(fused[base: base + hn])
            k.append(fused[base + hn: base + 2 * hn])
            v.append(fused[base + 2 * hn: base + 3 * hn])
    return torch.cat(q), torch.cat(k), torch.cat(v)


def reference_model(path):
    """A transformers CLIPModel with the NeMo tensors put in place by explicit names."""
    from transformers import CLIPConfig, CLIPModel

    config, w = read_nemo_plainly(path)
    vis, txt = config["vision"], config["text"]
    hf_cfg = CLIPConfig(
        text_config=dict(vocab_size=w["model.text_encoder.language_model.embedding.word_embeddings.weight"].shape[0],
                         hidden_size=txt["hidden_size"], intermediate_size=txt["ffn_hidden_size"],
                         num_hidden_layers=txt["num_layers"], num_attention_heads=txt["num_attention_heads"],
                         max_position_embeddings=txt["max_position_embeddings"], hidden_act="gelu",
                         layer_norm_eps=txt["layernorm_epsilon"], eos_token_id=49407, bos_token_id=49406),
        vision_config=dict(hidden_size=vis["hidden_size"], intermediate_size=vis["ffn_hidden_size"],
                           num_hidden_layers=vis["num_layers"], num_attention_heads=vis["num_attention_heads"],
                           image_size=vis["img_h"], patch_size=vis["patch_dim"], hidden_act="gelu",
                           layer_norm_eps=vis["layernorm_epsilon"]),
        projection_dim=config["output_dim"])
    torch.manual_seed(123)
    model = CLIPModel(hf_cfg).eval()
    sd = {}
    vb, tl = "model.vision_encoder.backbone.", "model.text_encoder.language_model."
    sd["vision_model.embeddings.class_embedding"] = w[vb + "cls_token"][0, 0]
    sd["vision_model.embeddings.patch_embedding.weight"] = w[vb + "conv1.weight"]
    sd["vision_model.embeddings.position_embedding.weight"] = w[vb + "position_embeddings"]
    sd["vision_model.pre_layrnorm.weight"] = w[vb + "preprocess_layernorm.weight"]
    sd["vision_model.pre_layrnorm.bias"] = w[vb + "preprocess_layernorm.bias"]
    sd["vision_model.post_layernorm.weight"] = w[vb + "transformer.final_layernorm.weight"]
    sd["vision_model.post_layernorm.bias"] = w[vb + "transformer.final_layernorm.bias"]
    sd["visual_projection.weight"] = w["model.vision_encoder.head.weight"]
    sd["text_model.embeddings.token_embedding.weight"] = w[tl + "embedding.word_embeddings.weight"]
    sd["text_model.embeddings.position_embedding.weight"] = w[tl + "embedding.position_embeddings"]
    sd["text_model.final_layer_norm.weight"] = w[tl + "encoder.final_layernorm.weight"]
    sd["text_model.final_layer_norm.bias"] = w[tl + "encoder.final_layernorm.bias"]
    sd["text_projection.weight"] = w["model.text_encoder.head.weight"]
    sd["logit_scale"] = w["model.logit_scale"]
    towers = [(vb + "transformer.layers.", "vision_model.encoder.layers.", vis),
              (tl + "encoder.layers.", "text_model.encoder.layers.", txt)]
    for src, dst, sec in towers:
        for i in range(sec["num_layers"]):
            s, d = f"{src}{i}.", f"{dst}{i}."
            for nemo_name, hf_name in [("input_layernorm", "layer_norm1"), ("post_attention_layernorm", "layer_norm2"),
                                       ("self_attention.dense", "self_attn.out_proj"), ("mlp.dense_h_to_4h", "mlp.fc1"),
                                       ("mlp.dense_4h_to_h", "mlp.fc2")]:
                sd[f"{d}{hf_name}.weight"] = w[f"{s}{nemo_name}.weight"]
                sd[f"{d}{hf_name}.bias"] = w[f"{s}{nemo_name}.bias"]
            for kind in ("weight", "bias"):
                q, k, v = unfuse_qkv_slowly(w[f"{s}self_attention.query_key_value.{kind}"],
                                            sec["num_attention_heads"], sec["megatron_legacy"])
                sd[f"{d}self_attn.q_proj.{kind}"], sd[f"{d}self_attn.k_proj.{kind}"] = q, k
                sd[f"{d}self_attn.v_proj.{kind}"] = v
    model.load_state_dict(sd, strict=True)
    return model.requires_grad_(False), config


def nemo_aligner_preprocess(images01, size):
    """image_text_rms.py:87-99,103: Compose([Resize(size, BICUBIC, antialias=True), CenterCrop(size),
    × 0.00392156862745098, Normalize(OPENAI mean, std)]) on each (H, W, C) image in [0, 255], permuted to C, H, W."""
    from torchvision.transforms import (
        CenterCrop,
        Compose,
        InterpolationMode,
        Normalize,
        Resize,
    )

    tf = Compose([Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True), CenterCrop(size),
                  lambda x: x * 0.00392156862745098,
                  Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    hwc = (images01 * 255.0).permute(0, 2, 3, 1)  # what megatron_sd_draftp_model.py passes: (B, H, W, C)
    return torch.stack([tf(img.permute(2, 0, 1)) for img in hwc])


def nemo_tokens(prompts, context):
    """clip_dataset.py:36-72 tokenize with the tiny CLIP tokenizer."""
    tok = clip_tokenizer()
    rows = []
    for text in prompts:
        tokens = [tok.bos_token_id] + tok.convert_tokens_to_ids(tok.tokenize(text)) + [tok.eos_token_id]
        if len(tokens) > context:
            tokens = tokens[:context]
            tokens[-1] = tok.eos_token_id
        rows.append(tokens + [tok.pad_token_id] * (context - len(tokens)))
    return torch.tensor(rows)


def reference_score(model, config, images01, prompts):
    pixels = nemo_aligner_preprocess(images01, config["vision"]["img_h"])
    ids = nemo_tokens(prompts, config["text"]["max_position_embeddings"])
    img = model.get_image_features(pixel_values=pixels).pooler_output
    txt = model.get_text_features(input_ids=ids).pooler_output
    return model.logit_scale.exp() * torch.matmul(F.normalize(img, dim=-1), F.normalize(txt, dim=-1).t()).diag()


def images(batch, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, h, w, generator=g)


# --------------------------------------------------------------------------- (a) scores match the reference
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("hw", [(40, 48), (32, 32), (24, 20)])  # shrink + crop, as is, enlarge + crop
def test_score_equals_independent_hf_clip(nemo_files, rewards, layout, hw):
    pytest.importorskip("torchvision")
    model, config = reference_model(nemo_files[layout])
    x = images(3, *hw, seed=hw[0])
    with torch.no_grad():
        ours = rewards[layout](x, PROMPTS)
        ref = reference_score(model, config, x, PROMPTS)
    assert ours.shape == (3,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    assert ours.std() > 0.1, "the tiny model's scores must differ between images/prompts to test anything"


def test_the_two_layouts_differ_and_a_wrong_unfuse_is_detected(nemo_files, rewards):
    """The same tensors read with the other q/k/v layout give another score: the layout matters."""
    pytest.importorskip("torchvision")
    model, config = reference_model(nemo_files["legacy"])
    x = images(2, 32, 32, seed=5)
    right = reference_score(model, config, x, PROMPTS[:2])
    for i in range(config["vision"]["num_layers"]):
        fused = read_nemo_plainly(nemo_files["legacy"])[1][
            f"model.vision_encoder.backbone.transformer.layers.{i}.self_attention.query_key_value.weight"]
        q, _, _ = unfuse_qkv_slowly(fused, config["vision"]["num_attention_heads"], legacy=False)
        model.vision_model.encoder.layers[i].self_attn.q_proj.weight.copy_(q)
    wrong = reference_score(model, config, x, PROMPTS[:2])
    assert (right - wrong).abs().max() > 1e-3
    torch.testing.assert_close(rewards["legacy"](x, PROMPTS[:2]), right, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fused_qkv_split_follows_nemo_attention(nemo_files, rewards, layout):
    """NeMo's own forward of query_key_value (attention.py:418-438, _transpose_last_dim at 337-352):
    mixed = x W^T + b; with megatron_legacy view [.., 3, np, hn] and swap → [.., np, 3, hn]; view
    [.., np, 3·hn] and split the last axis in three. The loaded model's q/k/v projections give the same."""
    _, w = read_nemo_plainly(nemo_files[layout])
    cfg = tiny_nemo_rm_config()
    heads, hidden = cfg["vision"]["num_attention_heads"], cfg["vision"]["hidden_size"]
    hn = hidden // heads
    x = torch.randn(5, 2, hidden, generator=torch.Generator().manual_seed(0))  # [s, b, h]
    hf = rewards[layout].model
    for tower, key, layers in [("vision", "model.vision_encoder.backbone.transformer.layers.{}", hf.vision_model),
                               ("text", "model.text_encoder.language_model.encoder.layers.{}", hf.text_model)]:
        for i in range(cfg[tower]["num_layers"]):
            prefix = key.format(i) + ".self_attention.query_key_value."
            mixed = x @ w[prefix + "weight"].t() + w[prefix + "bias"]
            if LAYOUTS[layout]:
                mixed = mixed.view(5, 2, 3, heads, hn).transpose(-2, -3).contiguous().view(5, 2, 3 * hidden)
            q, k, v = torch.split(mixed.view(5, 2, heads, 3 * hn), hn, dim=-1)
            attn = layers.encoder.layers[i].self_attn
            for ours, theirs in ((attn.q_proj, q), (attn.k_proj, k), (attn.v_proj, v)):
                torch.testing.assert_close(ours(x).view(5, 2, heads, hn), theirs, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- (b) differentiable
def test_gradient_matches_finite_differences_in_float64(nemo_files):
    reward = load_nemo_reward_model(nemo_files["legacy"]).double()
    x = images(2, 40, 36, seed=3).double().requires_grad_(True)
    prompts = PROMPTS[:2]
    reward(x, prompts).sum().backward()
    grad = x.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    eps = 1e-6
    for (b, c, i, j) in [(0, 0, 5, 7), (1, 2, 20, 30), (0, 1, 39, 0), (1, 0, 17, 18)]:
        xp, xm = x.detach().clone(), x.detach().clone()
        xp[b, c, i, j] += eps
        xm[b, c, i, j] -= eps
        with torch.no_grad():
            fd = (reward(xp, prompts).sum() - reward(xm, prompts).sum()) / (2 * eps)
        assert abs(fd.item() - grad[b, c, i, j].item()) <= 1e-6 + 1e-5 * abs(fd.item()), (b, c, i, j)


def test_gradient_matches_the_independent_model(nemo_files, rewards):
    pytest.importorskip("torchvision")
    model, config = reference_model(nemo_files["per_head"])
    x = images(2, 44, 40, seed=8)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    rewards["per_head"](xa, PROMPTS[:2]).sum().backward()
    reference_score(model, config, xb, PROMPTS[:2]).sum().backward()
    assert xa.grad.abs().max() > 0
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-6)
    assert all(not p.requires_grad for p in rewards["per_head"].parameters())


# --------------------------------------------------------------------------- (c) bad input
SD_CONFIG = {"target": "nemo.collections.multimodal.models.text_to_image.stable_diffusion.ldm.ddpm.MegatronLatentDiffusion",
             "unet_config": {"model_channels": 320}, "first_stage_config": {"embed_dim": 4},
             "cond_stage_config": {"version": "openai/clip-vit-large-patch14"}, "nemo_version": "2.1.0"}
SD_WEIGHTS = {"model.model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}


def _one_line_value_error(path, match):
    with pytest.raises(ValueError, match=match) as e:
        load_nemo_reward_model(str(path))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_stable_diffusion_nemo_is_refused(tmp_path):
    msg = _one_line_value_error(write_nemo(str(tmp_path / "sd.nemo"), SD_CONFIG, SD_WEIGHTS), "not a CLIP reward model")
    assert "MegatronLatentDiffusion" in msg and "vision / text" in msg and "expected a NeMo-Aligner CLIP reward model" in msg


def test_clip_config_with_weights_without_towers_is_refused(tmp_path):
    path = write_nemo(str(tmp_path / "odd.nemo"), tiny_nemo_rm_config(), SD_WEIGHTS)
    _one_line_value_error(path, "holds no CLIP vision/text towers")


def test_a_file_that_is_not_a_tar_is_refused(tmp_path):
    p = tmp_path / "rm.nemo"
    p.write_bytes(b"this is not an archive\n" * 10)
    _one_line_value_error(p, "is not a tar archive; expected a NeMo-Aligner CLIP reward model .nemo")
    z = tmp_path / "weights.nemo"
    torch.save({"a": torch.zeros(1)}, str(z))
    _one_line_value_error(z, "zip archive")


def _tar_with(path, extra_name, good=True):
    with tarfile.open(path, "w:") as tar:
        if good:
            data = yaml.safe_dump(tiny_nemo_rm_config()).encode()
            info = tarfile.TarInfo("./model_config.yaml")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        payload = b"pwned"
        info = tarfile.TarInfo(extra_name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.mark.parametrize("member", ["../evil.txt", "./sub/../../evil.txt", "/tmp/nemo_rm_abs_evil.txt"])
def test_a_tar_member_leaving_the_folder_is_refused(tmp_path, member):
    d = tmp_path / "inner"
    d.mkdir()
    path = _tar_with(str(d / "rm.nemo"), member)
    msg = _one_line_value_error(path, "unsafe tar member")
    assert repr(member) in msg
    assert not (tmp_path / "evil.txt").exists() and not (d / "evil.txt").exists()


def test_a_link_member_is_refused(tmp_path):
    path = str(tmp_path / "link.nemo")
    with tarfile.open(path, "w:") as tar:
        info = tarfile.TarInfo("./model_weights.ckpt")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    _one_line_value_error(path, "unsafe tar member './model_weights.ckpt' \\(a link")


def test_missing_unmapped_and_misshapen_tensors_are_named(tmp_path):
    cfg = tiny_nemo_rm_config()
    sd = tiny_nemo_rm_state_dict(cfg)
    gone = "model.text_encoder.language_model.encoder.layers.1.mlp.dense_4h_to_h.bias"
    sd_missing = {k: v for k, v in sd.items() if k != gone}
    msg = _one_line_value_error(write_nemo(str(tmp_path / "a.nemo"), cfg, sd_missing), "missing")
    assert gone in msg
    extra = "model.vision_encoder.backbone.transformer.layers.0.post_attention_layerscale.gamma"
    msg = _one_line_value_error(write_nemo(str(tmp_path / "b.nemo"), cfg, dict(sd, **{extra: torch.ones(32)})),
                                "no place in the CLIP reward model")
    assert extra in msg
    bad = "model.vision_encoder.head.weight"
    msg = _one_line_value_error(write_nemo(str(tmp_path / "c.nemo"), cfg, dict(sd, **{bad: torch.ones(16, 31)})),
                                "shape")
    assert bad in msg and "(16, 31)" in msg and "(16, 32)" in msg


def test_a_truncated_archive_is_refused(nemo_files, tmp_path):
    data = open(nemo_files["legacy"], "rb").read()
    p = tmp_path / "cut.nemo"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="damaged tar archive|cannot be loaded|not a tar archive"):
        load_nemo_reward_model(str(p))


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["vision"].update(activation="swiglu"), "vision.activation 'swiglu' is not supported"),
    (lambda c: c["text"].pop("megatron_legacy"), "text.megatron_legacy is missing"),
    (lambda c: c["vision"].update(class_token_length=8), "class_token_length 8 is not supported"),
    (lambda c: c["tokenizer"].update(library="sentencepiece"), "pass tokenizer_path"),
    (lambda c: c["text"].pop("hidden_size"), "not a CLIP reward model.*text section lacks hidden_size"),
])
def test_configs_we_cannot_score_exactly_are_refused(tmp_path, edit, match):
    cfg = tiny_nemo_rm_config()
    sd = tiny_nemo_rm_state_dict(cfg)
    edit(cfg)
    _one_line_value_error(write_nemo(str(tmp_path / "x.nemo"), cfg, sd), match)


def test_tokenizer_path_gives_the_same_scores(nemo_files, rewards, tmp_path):
    clip_tokenizer().save_pretrained(str(tmp_path / "tok"))
    reward = build_reward("nemo_clip", path=nemo_files["per_head"], tokenizer_path=str(tmp_path / "tok"))
    x = images(2, 36, 36, seed=4)
    torch.testing.assert_close(reward(x, PROMPTS[:2]), rewards["per_head"](x, PROMPTS[:2]))


def test_the_shell_blames_restore_from_path(tmp_path):
    p = tmp_path / "notatar.nemo"
    p.write_text("hello")
    with pytest.raises(InputError) as e:
        with attributed("rm.model.restore_from_path", "the reward", str(p)):
            build_reward("nemo_clip", path=str(p))
    assert e.value.key == "rm.model.restore_from_path" and "not a tar archive" in e.value.message


def test_registry_entry():
    assert "nemo_clip" in REWARDS
    with pytest.raises(FileNotFoundError, match="rm.model.restore_from_path"):
        build_reward("nemo_clip")
    with pytest.raises(ValueError, match="unknown arguments"):
        build_reward("nemo_clip", path="/nonexistent.nemo", scale=2.0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_reward("nemo_clip", path="/nonexistent/rm.nemo")


# --------------------------------------------------------------------------- (d) the layout NeMo writes
# nemo/core/connectors/save_restore_connector.py (v2.1.0) lines 39-40: "model_config.yaml", "model_weights.ckpt";
# lines 591-592: tarfile.open(filename, "w:") and tar.add(source_dir, arcname=".") → "." then "./<name>" (sorted).
NEMO_MEMBERS = [".", "./model_config.yaml", "./model_weights.ckpt"]
# NeMo-Aligner examples/mm/clip/conf/baseline.yaml: model.output_dim (67), vision (76), text (139),
# tokenizer (214), make_vocab_size_divisible_by (223); nemo/core/classes/modelPT.py (v2.1.0) 118-126 add
# target and nemo_version.
TOP_KEYS = {"output_dim", "vision", "text", "tokenizer", "make_vocab_size_divisible_by", "target", "nemo_version",
            "tensor_model_parallel_size", "precision", "megatron_amp_O2"}
# baseline.yaml vision 79-98 and 136; text 146-152 and 190.
VISION_KEYS = {"patch_dim", "img_h", "img_w", "num_channels", "global_average_pool", "output_dim", "class_token_length",
               "preprocess_layernorm", "position_embedding_type", "num_layers", "hidden_size", "ffn_hidden_size",
               "num_attention_heads", "layernorm_epsilon", "megatron_legacy", "activation", "openai_gelu"}
TEXT_KEYS = {"output_dim", "encoder_seq_length", "max_position_embeddings", "position_embedding_type", "num_layers",
             "hidden_size", "ffn_hidden_size", "num_attention_heads", "layernorm_epsilon", "megatron_legacy",
             "activation", "openai_gelu", "bias_activation_fusion"}
# examples/multimodal/vision_language_foundation/clip/convert_external_clip_to_nemo.py (v2.1.0):
# layer names 108-119, prefixes 132 and 134, embeddings/heads 101-105, 120-126, conv1 182; all under "model."
# (MegatronCLIPModel.self.model, megatron_clip_models.py 698-718; NeMo-Aligner image_text_rms.py 45-56).
LAYER_SUFFIXES = ["input_layernorm.weight", "input_layernorm.bias", "self_attention.query_key_value.weight",
                  "self_attention.query_key_value.bias", "self_attention.dense.weight", "self_attention.dense.bias",
                  "post_attention_layernorm.weight", "post_attention_layernorm.bias", "mlp.dense_h_to_4h.weight",
                  "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias"]
VISION_LAYER = "model.vision_encoder.backbone.transformer.layers."
TEXT_LAYER = "model.text_encoder.language_model.encoder.layers."
NON_LAYER_KEYS = {
    "model.logit_scale",                                                     # image_text_rms.py:56
    "model.vision_encoder.backbone.cls_token",                               # converter 126, reshape 150-152
    "model.vision_encoder.backbone.conv1.weight",                            # converter 182
    "model.vision_encoder.backbone.position_embeddings",                     # converter 124 (learned_parameters)
    "model.vision_encoder.backbone.preprocess_layernorm.weight",             # converter 120
    "model.vision_encoder.backbone.preprocess_layernorm.bias",               # converter 121
    "model.vision_encoder.backbone.transformer.final_layernorm.weight",      # converter 122
    "model.vision_encoder.backbone.transformer.final_layernorm.bias",        # converter 123
    "model.vision_encoder.head.weight",                                      # converter 125, 149
    "model.text_encoder.language_model.embedding.position_embeddings",       # converter 101
    "model.text_encoder.language_model.embedding.word_embeddings.weight",    # converter 102
    "model.text_encoder.language_model.encoder.final_layernorm.weight",      # converter 103
    "model.text_encoder.language_model.encoder.final_layernorm.bias",        # converter 104
    "model.text_encoder.head.weight",                                        # converter 105, 148
}


def test_archive_layout_matches_what_nemo_writes(nemo_files):
    path = nemo_files["legacy"]
    with tarfile.open(path, "r:") as tar:  # uncompressed, as "w:" writes it
        assert tar.getnames() == NEMO_MEMBERS
        assert tar.getmember(".").isdir()
    config, w = read_nemo_plainly(path)
    assert TOP_KEYS <= set(config) and "model" not in config  # modelPT.py:113-115 forbids a model node
    assert config["target"] == "nemo_aligner.models.mm.stable_diffusion.image_text_rms.MegatronCLIPRewardModel"
    assert config["nemo_version"] == "2.1.0"
    assert VISION_KEYS <= set(config["vision"]) and TEXT_KEYS <= set(config["text"])
    assert config["vision"]["megatron_legacy"] is True and config["text"]["megatron_legacy"] is True
    assert config["tokenizer"]["library"] == "huggingface"
    s = TINY_NEMO_RM
    layers = s["layers"]
    expected = set(NON_LAYER_KEYS)
    expected |= {f"{pre}{i}.{suf}" for pre in (VISION_LAYER, TEXT_LAYER) for i in range(layers) for suf in LAYER_SUFFIXES}
    tensors = {k for k, v in w.items() if torch.is_tensor(v)}
    assert tensors == expected
    extra = {k for k in w if k not in tensors}  # megatron-core parallel linears: get_extra_state() -> None
    assert all(w[k] is None and k.endswith("._extra_state") for k in extra) and len(extra) == 2 * layers * 4
    h, d = s["hidden"], s["output_dim"]
    grid = (s["image"] // s["patch"]) ** 2
    assert w[VISION_LAYER + "0.self_attention.query_key_value.weight"].shape == (3 * h, h)  # converter 211: dim 0
    assert w[TEXT_LAYER + "1.mlp.dense_h_to_4h.weight"].shape == (s["ffn"], h)
    assert w["model.vision_encoder.backbone.cls_token"].shape == (1, 1, h)
    assert w["model.vision_encoder.backbone.position_embeddings"].shape == (grid + 1, h)
    assert w["model.vision_encoder.backbone.conv1.weight"].shape == (h, 3, s["patch"], s["patch"])
    assert w["model.vision_encoder.head.weight"].shape == (d, h)
    assert w["model.text_encoder.language_model.embedding.word_embeddings.weight"].shape == (49408, h)
    assert w["model.text_encoder.language_model.embedding.position_embeddings"].shape == (s["context"], h)
    assert w["model.logit_scale"].shape == () and np.isclose(float(w["model.logit_scale"]), np.log(1 / 0.07))


def test_config_nested_under_model_and_an_unpacked_folder_load(nemo_files, rewards, tmp_path):
    """NeMo restores cfg.model when the YAML has a model node (save_restore_connector.py:167-168) and reads an
    unpacked folder when pack_nemo_file is off."""
    config, w = read_nemo_plainly(nemo_files["legacy"])
    nested = write_nemo(str(tmp_path / "nested.nemo"), {"model": config, "trainer": {"devices": 1}}, w)
    folder = tmp_path / "unpacked"
    with tarfile.open(nemo_files["legacy"]) as tar:
        for name in ("./model_config.yaml", "./model_weights.ckpt"):
            folder.mkdir(exist_ok=True)
            (folder / os.path.basename(name)).write_bytes(tar.extractfile(name).read())
    x = images(2, 32, 32, seed=11)
    want = rewards["legacy"](x, PROMPTS[:2])
    for p in (nested, str(folder)):
        torch.testing.assert_close(load_nemo_reward_model(p)(x, PROMPTS[:2]), want)
