"""ImageReward (``rm.name: imagereward``) on a tiny random checkpoint in the released format.

The tiny ``ImageReward.pt`` / ``med_config.json`` / BERT ``vocab.txt`` follow the layout of THUDM/ImageReward
at commit c1392c6dd0fd6ecd6d416c96959ab744a6d0a8fb: ``ImageReward/ImageReward.py`` (``ImageReward``:
``blip``, ``mlp = MLP(768)``, mean/std, ``score()`` with max_length 35), ``ImageReward/models/BLIP/
blip_pretrain.py``, ``blip.py`` (``init_tokenizer``), ``vit.py``, ``med.py`` and ``train/src/config/
med_config.json`` (built by :mod:`nemo_aligner_draft.testing.imagereward`).

The reference is an independent implementation of the same architecture: transformers' ``BlipVisionModel``
(BLIP's ViT) and ``BlipTextModel`` (BLIP's cross-attending BERT), with the same tiny weights mapped into
them by hand, and ImageReward's score written out here (first-token state → MLP → (r − mean)/std), fed
by ImageReward's own torchvision-on-PIL preprocessing.
"""
import json
import os
import shutil

import pytest
import torch

from nemo_aligner_draft.rewards import build_reward
from nemo_aligner_draft.testing.imagereward import TINY_IMAGEREWARD, save_tiny_imagereward
from reward_helpers import PROMPTS, smooth_images, to_pil

# ImageReward/ImageReward.py, class ImageReward (written out, not imported from the package)
UPSTREAM_MEAN, UPSTREAM_STD = 0.16717362830052426, 1.0333394966054072
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
EXACT_TOL = 1e-5
# Torch vs PIL preprocessing differs by ≤ 1.1 uint8 levels per pixel (0.3 level mean); on this random tiny
# model (32-px patches, variance-preserving weights: sensitive) that moved scores by at most 8.7e-3 over
# 5 shapes (256×301, 301×256, 64², 512², 1024²) × 3 seeds, while scores spread over ≈ 0.3–1.1: allow 0.02.
E2E_TOL = 0.02
LEVEL = 1 / 255 / 0.26130258  # one uint8 level in normalised units (see test_preprocess.py)
# A prompt longer than 35 BERT tokens (truncated) and one with an out-of-vocabulary word ([UNK]).
LONG_PROMPT = " ".join(["a red fox in the snow at dusk"] * 6)
ALL_PROMPTS = [*PROMPTS, LONG_PROMPT, "a zebra on the moon"]


@pytest.fixture(scope="module")
def tiny_ir(tmp_path_factory) -> str:
    return save_tiny_imagereward(str(tmp_path_factory.mktemp("imagereward")))


def upstream_preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """ImageReward's ``_transform(n_px)``: torchvision on PIL images."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    t = Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size),
                 lambda im: im.convert("RGB"), ToTensor(), Normalize(CLIP_MEAN, CLIP_STD)])
    return torch.stack([t(im) for im in to_pil(images)])


def transformers_imagereward(ckpt: str, vision_heads=None):
    """``(pixels [B,3,S,S], prompts) -> [B]`` from transformers' BLIP modules holding the checkpoint's weights.

    Layout differences, mapped explicitly: BLIP's ViT (timm names) → transformers' ``embeddings.
    {class_embedding, patch_embedding, position_embedding}``, ``encoder.layers.N.{layer_norm1, self_attn.qkv,
    self_attn.projection, layer_norm2, mlp.fc1, mlp.fc2}``, ``post_layernorm``. Both fuse q, k, v into one
    ``qkv`` with the same row order ([q; k; v], heads contiguous), so those weights copy as they are. BLIP's
    ViT uses LayerNorm eps 1e-6; transformers' BlipVisionConfig defaults to 1e-5, so it is set here. BLIP's
    BERT and ``BlipTextModel`` share names; transformers builds the cross-attention only with
    ``is_decoder=True`` in the config, while the forward call passes ``is_decoder=False`` to get
    ImageReward's bidirectional (padding-only) self-attention mask. ``position_ids`` is a non-persistent
    buffer in transformers, so it is dropped. Attention is forced to "eager": BlipText adds the mask to
    its scores itself, which needs the additive (not boolean) mask form.
    """
    from transformers import BertTokenizer, BlipVisionConfig, BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextConfig, BlipTextModel

    sd = torch.load(ckpt, map_location="cpu", weights_only=True)
    med = json.load(open(os.path.join(os.path.dirname(ckpt), "med_config.json")))
    s = TINY_IMAGEREWARD

    vision_map = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
                  "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
                  "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
                  "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
    block_map = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
                 "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    vision_sd = {}
    for key, value in sd.items():
        if not key.startswith("blip.visual_encoder."):
            continue
        k = key[len("blip.visual_encoder."):]
        if k in vision_map:
            vision_sd[vision_map[k]] = value
            continue
        _, i, rest = k.split(".", 2)  # blocks.<i>.<module>.<weight|bias>
        module, param = rest.rsplit(".", 1)
        vision_sd[f"encoder.layers.{i}.{block_map[module]}.{param}"] = value
    vcfg = BlipVisionConfig(hidden_size=s["vision_width"], intermediate_size=s["vision_mlp"],
                            num_hidden_layers=s["vision_depth"], image_size=s["image_size"],
                            patch_size=s["patch_size"], layer_norm_eps=1e-6, hidden_act="gelu",
                            num_attention_heads=vision_heads or s["vision_width"] // 64)
    vision = BlipVisionModel(vcfg).eval()
    vision.load_state_dict(vision_sd, strict=True)

    text_sd = {k[len("blip.text_encoder."):]: v for k, v in sd.items()
               if k.startswith("blip.text_encoder.") and not k.endswith("position_ids")}
    tcfg = BlipTextConfig(vocab_size=med["vocab_size"], hidden_size=med["hidden_size"],
                          encoder_hidden_size=s["vision_width"], intermediate_size=med["intermediate_size"],
                          num_hidden_layers=med["num_hidden_layers"], num_attention_heads=med["num_attention_heads"],
                          max_position_embeddings=med["max_position_embeddings"], layer_norm_eps=med["layer_norm_eps"],
                          hidden_act="gelu", pad_token_id=0, bos_token_id=None, sep_token_id=None,
                          is_decoder=True)
    tcfg._attn_implementation = "eager"
    text = BlipTextModel(tcfg, add_pooling_layer=False).eval()
    text.load_state_dict(text_sd, strict=True)

    mlp = torch.nn.Sequential(torch.nn.Linear(med["hidden_size"], 1024), torch.nn.Dropout(0.2),
                              torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2), torch.nn.Linear(128, 64),
                              torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1)).eval()
    mlp.load_state_dict({k[len("mlp.layers."):]: v for k, v in sd.items() if k.startswith("mlp.layers.")}, strict=True)

    tok = BertTokenizer.from_pretrained(os.path.dirname(ckpt), local_files_only=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})

    @torch.no_grad()
    def score(pixels, prompts):
        image_embeds = vision(pixel_values=pixels).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
        t = tok(list(prompts), padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        out = text(input_ids=t.input_ids, attention_mask=t.attention_mask, encoder_hidden_states=image_embeds,
                   encoder_attention_mask=image_atts, is_decoder=False)
        return ((mlp(out.last_hidden_state[:, 0, :]) - UPSTREAM_MEAN) / UPSTREAM_STD).squeeze(-1)

    return score


def test_loads_scores_and_backpropagates(tiny_ir):
    reward = build_reward("imagereward", path=tiny_ir)
    assert reward.differentiable and reward.name == "imagereward"
    assert not any(p.requires_grad for p in reward.parameters())
    reward.train()  # the trainer may call train(): dropout in the head must stay off
    assert not reward.training and not reward.mlp.training
    images = smooth_images(2, 64, 64, seed=30).requires_grad_(True)
    r = reward(images, PROMPTS)
    assert r.shape == (2,) and r.dtype == torch.float32 and torch.isfinite(r).all()
    r.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    torch.testing.assert_close(reward(images.detach(), PROMPTS), r.detach())  # deterministic
    assert len(reward._tokens) == 2  # tokenisation cached per prompt


@pytest.mark.parametrize("vision_heads", [None, 4])
def test_equals_transformers_blip_computation(tiny_ir, tmp_path, vision_heads):
    """Same weights in transformers' BLIP: equal to float32 round-off on the same pixels; with our torch
    preprocessing instead of PIL, within what the preprocessing difference moves the score."""
    images = smooth_images(4, 256, 301, seed=31)
    prompts = ALL_PROMPTS
    pixels = upstream_preprocess(images, TINY_IMAGEREWARD["image_size"])
    ref = transformers_imagereward(tiny_ir, vision_heads)(pixels, prompts)
    kwargs = {"vision_heads": vision_heads} if vision_heads else {}
    reward = build_reward("imagereward", path=tiny_ir, **kwargs)
    exact = build_reward("imagereward", path=tiny_ir, **kwargs)
    exact.preprocess = torch.nn.Identity()
    with torch.no_grad():
        r_exact = exact(pixels, prompts)
        r = reward(images, prompts)
        same_image = exact(pixels[:1].expand(2, -1, -1, -1), PROMPTS)
    torch.testing.assert_close(r_exact, ref, atol=EXACT_TOL, rtol=0)  # measured ≤ 1.4e-6
    # the checks can fail: images and prompts both move the score by far more than the tolerances
    assert ref.max() - ref.min() > 5 * E2E_TOL
    assert (same_image[0] - same_image[1]).abs() > 100 * EXACT_TOL
    with torch.no_grad():
        other_prompts = exact(pixels, prompts[::-1])
    assert (other_prompts - r_exact).abs().max() > 100 * EXACT_TOL
    torch.testing.assert_close(r, ref, atol=E2E_TOL, rtol=0)
    if vision_heads:  # the head count is not in the checkpoint; it must change the result
        default = build_reward("imagereward", path=tiny_ir)
        default.preprocess = torch.nn.Identity()
        with torch.no_grad():
            assert (default(pixels, prompts) - r_exact).abs().max() > 1e-3


def test_fp32_option_and_bf16(tiny_ir):
    """rm.fp32: under bf16 autocast the score equals the fp32 one and a bf16 cast from outside is ignored;
    without it autocast really changes the result and a bf16-cast model still scores (float32 out)."""
    images = smooth_images(2, 64, 64, seed=32)
    plain = build_reward("imagereward", path=tiny_ir)
    forced = build_reward("imagereward", path=tiny_ir, fp32=True)
    with torch.no_grad():
        ref = plain(images, PROMPTS)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            r_auto = plain(images, PROMPTS)
            r_fp32 = forced(images, PROMPTS)
        forced.to(torch.bfloat16)
        r_cast = forced(images, PROMPTS)
        plain.to(torch.bfloat16)
        r_bf16 = plain(images.bfloat16(), PROMPTS)
    assert r_auto.dtype == r_fp32.dtype == r_bf16.dtype == torch.float32
    torch.testing.assert_close(r_fp32, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(r_cast, ref, atol=1e-6, rtol=0)
    assert (r_auto - ref).abs().max() > 1e-4 and torch.isfinite(r_bf16).all()
    assert all(p.dtype == torch.float32 for p in forced.parameters())
    assert all(p.dtype == torch.bfloat16 for p in plain.parameters())


@pytest.mark.parametrize("shape", [(256, 301), (64, 64), (512, 512)])
def test_preprocessing_matches_upstream_pil_pipeline(tiny_ir, shape):
    """Resize(224, BICUBIC) on PIL → CenterCrop(224) → Normalize(CLIP): within ~1 uint8 level per pixel
    (limits and their measurement: test_preprocess.py), on smooth images."""
    reward = build_reward("imagereward", path=tiny_ir)
    images = smooth_images(2, *shape, seed=sum(shape))
    ref = upstream_preprocess(images, 224)
    ours = reward.preprocess(images)
    assert ours.shape == ref.shape == (2, 3, 224, 224)
    d = (ours - ref).abs()
    assert d.max() <= 1.5 * LEVEL and d.mean() <= 0.4 * LEVEL, (shape, d.max().item(), d.mean().item())
    with torch.no_grad():
        end_to_end = reward(images, PROMPTS)
        exact = build_reward("imagereward", path=tiny_ir)
        exact.preprocess = torch.nn.Identity()
        torch.testing.assert_close(end_to_end, exact(ref, PROMPTS), atol=E2E_TOL, rtol=0)


def test_released_format_extras_are_ignored_and_anything_else_is_refused(tiny_ir, tmp_path):
    sd = torch.load(tiny_ir, weights_only=True)
    # what the released file carries besides the scoring weights (BLIP_Pretrain's projections, the buffer)
    assert {"blip.vision_proj.weight", "blip.text_proj.bias", "blip.text_encoder.embeddings.position_ids"} <= set(sd)
    d = tmp_path / "extra"
    shutil.copytree(os.path.dirname(tiny_ir), d)
    sd["blip.itm_head.weight"] = torch.zeros(2, TINY_IMAGEREWARD["text_width"])
    torch.save(sd, d / "ImageReward.pt")
    with pytest.raises(ValueError, match=r"unexpected 1 key\(s\).*blip\.itm_head\.weight"):
        build_reward("imagereward", path=str(d / "ImageReward.pt"))


def _without(tiny_ir, tmp_path, prefix):
    d = tmp_path / "cut"
    shutil.copytree(os.path.dirname(tiny_ir), d)
    sd = {k: v for k, v in torch.load(tiny_ir, weights_only=True).items() if not k.startswith(prefix)}
    torch.save(sd, d / "ImageReward.pt")
    return str(d / "ImageReward.pt")


def test_bad_inputs_name_the_path_and_key(tiny_ir, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_reward("imagereward", path=str(tmp_path / "missing.pt"))
    no_head = _without(tiny_ir, tmp_path, "mlp.layers.")
    with pytest.raises(ValueError, match=r"mlp\.layers\.0\.weight") as e:
        build_reward("imagereward", path=no_head)
    assert no_head in str(e.value)
    last_layer = _without(tiny_ir, tmp_path / "x", "blip.text_encoder.encoder.layer.1.")
    with pytest.raises(ValueError, match=r"missing \d+ key\(s\).*encoder\.layer\.1\.attention"):
        build_reward("imagereward", path=last_layer)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(tiny_ir, alone / "ImageReward.pt")
    with pytest.raises(FileNotFoundError, match="med_config.json"):
        build_reward("imagereward", path=str(alone / "ImageReward.pt"))
    here = os.path.dirname(tiny_ir)
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        build_reward("imagereward", path=str(alone / "ImageReward.pt"), med_config=os.path.join(here, "med_config.json"))
    # a tokenizer whose size does not match the embedding table (BLIP's two added tokens missing from the count)
    med = json.load(open(os.path.join(here, "med_config.json")))
    med["vocab_size"] -= 2
    json.dump(med, open(alone / "med_config.json", "w"))
    with pytest.raises(ValueError, match=r"\[DEC\] and \[ENC\]"):
        build_reward("imagereward", path=str(alone / "ImageReward.pt"), tokenizer_path=here)
    with pytest.raises(ValueError, match="unknown arguments"):
        build_reward("imagereward", path=tiny_ir, clip_path="x")
    reward = build_reward("imagereward", path=tiny_ir)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward(torch.rand(2, 3, 64, 64), ["a fox"])


def _cli_args(sd_dir, run_dir, extra):
    return ["--config-name=draftp_tiny", f"model.pretrained={sd_dir}", f"exp_manager.explicit_log_dir={run_dir}",
            "trainer.max_steps=2", "trainer.draftp_sd.max_steps=2", "trainer.draftp_sd.val_check_interval=2",
            "trainer.draftp_sd.save_interval=2", "trainer.draftp_sd.limit_val_batches=1",
            "model.infer.inference_steps=2", "model.micro_batch_size=2", "model.global_batch_size=2",
            "rm.name=imagereward", *extra]


def test_cli_trains_draftp_on_imagereward(tiny_sd_dir, tiny_ir, tmp_path):
    from nemo_aligner_draft.cli.train import main

    run_dir = tmp_path / "run"
    assert main(_cli_args(tiny_sd_dir, run_dir, [f"rm.model.restore_from_path={tiny_ir}"])) == 0
    train = json.load(open(run_dir / "metrics.json"))["train"]
    assert train[-1]["step"] == 2 and all(torch.isfinite(torch.tensor(h["reward_mean"])) for h in train)


def test_cli_bad_checkpoint_is_one_line_exit_2(tiny_sd_dir, tiny_ir, tmp_path, capsys):
    from nemo_aligner_draft.cli.train import main

    no_head = _without(tiny_ir, tmp_path, "mlp.layers.")
    run_dir = tmp_path / "run"
    assert main(_cli_args(tiny_sd_dir, run_dir, [f"rm.model.restore_from_path={no_head}"])) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "rm.model.restore_from_path" in err[0] and "mlp.layers.0.weight" in err[0], err
    assert no_head in err[0] and not run_dir.exists()
