"""clip_score / pickscore / hpsv2 loaded from tiny models on disk vs direct library calls."""
import pytest
import torch
import torch.nn.functional as F

from nemo_aligner_draft.rewards import build_reward
from reward_helpers import PROMPTS, smooth_images, to_pil

# End-to-end (torch vs PIL preprocessing) score tolerance: the preprocessing differs by ≈ 0.005 mean
# in normalised units (see test_preprocess.py); on these random tiny encoders that moved a cosine by
# at most 4.1e-4 over 64², 256², 512², 256×301 inputs (cosines themselves ≈ 0.01–0.09): we allow 1e-3.
# With identical pixel inputs the scores agree to float32 round-off (1e-5).
E2E_COS_TOL = 1e-3
EXACT_TOL = 1e-5


def _hf_reference(path, images, prompts):
    """Direct transformers call: CLIPProcessor (PIL preprocessing + tokenizer) → CLIPModel."""
    from transformers import CLIPModel, CLIPProcessor

    proc = CLIPProcessor.from_pretrained(path, local_files_only=True)
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    inputs = proc(text=list(prompts), images=to_pil(images), padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
        img = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        txt = model.get_text_features(input_ids=inputs["input_ids"],
                                      attention_mask=inputs["attention_mask"]).pooler_output
    cos = F.cosine_similarity(img, txt, dim=-1)
    return cos, out.logits_per_image.diagonal(), inputs["pixel_values"], model.logit_scale.exp().item()


def _pixels_as_is(reward):
    """Feed already-preprocessed pixel_values through the reward (isolates model + text + scoring)."""
    reward.encoder.preprocess = torch.nn.Identity()
    return reward


def test_clip_score_hf_equals_transformers(tiny_hf_clip_dir):
    images = smooth_images(2, 256, 256, seed=5)
    cos, _, pixels, _ = _hf_reference(tiny_hf_clip_dir, images, PROMPTS)
    reward = build_reward("clip_score", path=tiny_hf_clip_dir)
    with torch.no_grad():
        r = reward(images, PROMPTS)
        r_exact = _pixels_as_is(build_reward("clip_score", path=tiny_hf_clip_dir))(pixels, PROMPTS)
    assert r.shape == (2,)
    torch.testing.assert_close(r_exact, cos, atol=EXACT_TOL, rtol=0)
    torch.testing.assert_close(r, cos, atol=E2E_COS_TOL, rtol=0)
    # the two prompts score differently for the same image: text actually conditions the score
    with torch.no_grad():
        swapped = reward(images, PROMPTS[::-1])
    assert (swapped - r).abs().max() > 10 * EXACT_TOL


def test_clip_score_scale_kwarg(tiny_hf_clip_dir):
    images = smooth_images(2, 64, 64, seed=6)
    with torch.no_grad():
        r1 = build_reward("clip_score", path=tiny_hf_clip_dir)(images, PROMPTS)
        r100 = build_reward("clip_score", path=tiny_hf_clip_dir, scale=100.0)(images, PROMPTS)
    torch.testing.assert_close(r100, 100 * r1)


def test_pickscore_equals_clipmodel_logits(tiny_hf_clip_dir):
    """PickScore's reference: logit_scale.exp() · cos — CLIPModel's own logits_per_image diagonal."""
    images = smooth_images(2, 512, 512, seed=7)
    cos, logits, pixels, scale = _hf_reference(tiny_hf_clip_dir, images, PROMPTS)
    assert abs(scale - torch.tensor(2.3).exp().item()) < 1e-4  # the tiny model's non-default scale
    with torch.no_grad():
        r = build_reward("pickscore", path=tiny_hf_clip_dir)(images, PROMPTS)
        r_exact = _pixels_as_is(build_reward("pickscore", path=tiny_hf_clip_dir))(pixels, PROMPTS)
    torch.testing.assert_close(r_exact, logits, atol=EXACT_TOL * scale, rtol=0)
    torch.testing.assert_close(r, logits, atol=E2E_COS_TOL * scale, rtol=0)


def test_pickscore_processor_path(tiny_hf_clip_dir, tmp_path):
    """PickScore ships the model and the processor in different repos: processor_path points at the
    processor; without preprocessor_config.json the loader names the directory."""
    import shutil

    model_only = tmp_path / "model_only"
    model_only.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(f"{tiny_hf_clip_dir}/{f}", model_only / f)
    with pytest.raises(FileNotFoundError, match="no CLIP processor in .*model_only"):
        build_reward("pickscore", path=str(model_only))
    images = smooth_images(1, 64, 64, seed=8)
    with torch.no_grad():
        a = build_reward("pickscore", path=str(model_only), processor_path=tiny_hf_clip_dir)(images, PROMPTS[:1])
        b = build_reward("pickscore", path=tiny_hf_clip_dir)(images, PROMPTS[:1])
    torch.testing.assert_close(a, b)


def _open_clip_reference(arch, ckpt, images, prompts):
    """Direct open_clip call, as HPSv2 scores: its own preprocess, model(image, text) → normalised
    features, diagonal of image_features @ text_features.T."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=ckpt)
    model.eval()
    pixels = torch.stack([preprocess(im) for im in to_pil(images)])
    with torch.no_grad():
        img_f, txt_f, _ = model(pixels, open_clip.get_tokenizer(arch)(list(prompts)))
    return (img_f @ txt_f.T).diagonal(), pixels


def test_hpsv2_equals_open_clip(tiny_open_clip):
    arch, ckpt = tiny_open_clip
    images = smooth_images(2, 256, 301, seed=9)
    ref, pixels = _open_clip_reference(arch, ckpt, images, PROMPTS)
    with torch.no_grad():
        r = build_reward("hpsv2", path=ckpt, arch=arch)(images, PROMPTS)
        r_exact = _pixels_as_is(build_reward("hpsv2", path=ckpt, arch=arch))(pixels, PROMPTS)
        r_clip = build_reward("clip_score", path=ckpt, backend="open_clip", arch=arch)(images, PROMPTS)
    torch.testing.assert_close(r_exact, ref, atol=EXACT_TOL, rtol=0)
    torch.testing.assert_close(r, ref, atol=E2E_COS_TOL, rtol=0)
    torch.testing.assert_close(r_clip, r)


def test_hpsv2_plain_state_dict_with_module_prefix(tiny_open_clip, tmp_path):
    """A bare state dict saved from DDP (``module.`` keys) loads to the same scores."""
    arch, ckpt = tiny_open_clip
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    bare = tmp_path / "bare.pt"
    torch.save({f"module.{k}": v for k, v in sd.items()}, bare)
    images = smooth_images(1, 64, 64, seed=10)
    with torch.no_grad():
        a = build_reward("hpsv2", path=str(bare), arch=arch)(images, PROMPTS[:1])
        b = build_reward("hpsv2", path=ckpt, arch=arch)(images, PROMPTS[:1])
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["clip_score", "pickscore", "hpsv2"])
@pytest.mark.parametrize("size", [64, 256])
def test_gradients_reach_images(name, size, tiny_hf_clip_dir, tiny_open_clip):
    arch, ckpt = tiny_open_clip
    reward = build_reward(name, path=ckpt, arch=arch) if name == "hpsv2" else build_reward(name, path=tiny_hf_clip_dir)
    assert not any(p.requires_grad for p in reward.parameters())
    images = smooth_images(2, size, size, seed=11).requires_grad_(True)
    reward(images, PROMPTS).sum().backward()
    g = images.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert all(p.grad is None for p in reward.parameters())


@pytest.mark.parametrize("size", [64, 256])
def test_clip_score_gradient_matches_finite_differences(tiny_hf_clip_dir, size):
    """d r / d x along a random direction vs a central difference, in float64. Pixels are kept in
    [0.2, 0.8] so the post-resize clamp is inactive (it is flat only where PIL would clip too)."""
    reward = build_reward("clip_score", path=tiny_hf_clip_dir).double()
    g = torch.Generator().manual_seed(12)
    x = (0.2 + 0.6 * smooth_images(1, size, size, seed=12)).double().requires_grad_(True)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    reward(x, PROMPTS[:1]).sum().backward()
    analytic = (x.grad * v).sum().item()
    h = 1e-4
    with torch.no_grad():
        fd = (reward(x + h * v, PROMPTS[:1]) - reward(x - h * v, PROMPTS[:1])).item() / (2 * h)
    assert abs(analytic) > 1e-6
    assert abs(fd - analytic) <= 1e-5 * max(1.0, abs(analytic)), (fd, analytic)


def test_fp32_option_under_bf16_autocast(tiny_hf_clip_dir):
    """fp32=True: the score under bf16 autocast equals the plain fp32 score; without it autocast
    really changes the result (so the comparison can fail); a bf16 cast from outside leaves the
    weights in float32 (exactly: the scores after it are unchanged)."""
    images = smooth_images(2, 64, 64, seed=13)
    plain = build_reward("clip_score", path=tiny_hf_clip_dir)
    forced = build_reward("clip_score", path=tiny_hf_clip_dir, fp32=True)
    with torch.no_grad():
        ref = plain(images, PROMPTS)
        ref_bf16_input = plain(images.bfloat16().float(), PROMPTS)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            r_auto = plain(images, PROMPTS)
            r_fp32 = forced(images, PROMPTS)
        forced.to(torch.bfloat16)  # what a bf16-true trainer does to every submodule
        with torch.autocast("cpu", dtype=torch.bfloat16):
            r_cast = forced(images.bfloat16(), PROMPTS)
    assert r_fp32.dtype == r_auto.dtype == torch.float32
    torch.testing.assert_close(r_fp32, ref, atol=1e-6, rtol=0)
    assert (r_auto - ref).abs().max() > 1e-4
    assert all(p.dtype == torch.float32 for p in forced.parameters())
    # the input itself was rounded to bf16 by the caller; only that rounding remains
    torch.testing.assert_close(r_cast, ref_bf16_input, atol=1e-6, rtol=0)
    plain.to(torch.bfloat16)  # without fp32 the cast applies
    assert all(p.dtype == torch.bfloat16 for p in plain.parameters())


def test_missing_paths_and_bad_arguments(tiny_open_clip, tmp_path):
    missing = str(tmp_path / "nope")
    for name in ("clip_score", "pickscore"):
        with pytest.raises(FileNotFoundError, match="nope"):
            build_reward(name, path=missing)
    with pytest.raises(FileNotFoundError, match="none given"):
        build_reward("pickscore")
    with pytest.raises(FileNotFoundError, match="nope"):
        build_reward("hpsv2", path=missing)
    arch, ckpt = tiny_open_clip
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    sd.pop("text_projection")
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=f"partial.pt.*does not fit open_clip architecture '{arch}'"):
        build_reward("hpsv2", path=str(tmp_path / "partial.pt"), arch=arch)
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        build_reward("hpsv2", path=ckpt, arch="no-such-arch")
    with pytest.raises(ValueError, match="unknown arguments"):
        build_reward("hpsv2", path=ckpt, arch=arch, bogus=1)
    with pytest.raises(ValueError, match="backend"):
        build_reward("clip_score", path=ckpt, backend="jax")
