"""Conversion entry points on a real tiny training run (DRaFT+, 2 steps, LoRA) and on tiny NeMo-layout
checkpoints: merged pipeline vs base+LoRA, LoRA file vs the run's own export, .nemo round trips,
NeMo-Aligner adapter import vs the ParallelLinearAdapter formula, bad input and no partial output."""
import os
import sys

import pytest
import torch

from nemo_aligner_draft.cli.convert import main as convert
from nemo_aligner_draft.export.ldm_layout import unet_key_map

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "cli"))


@pytest.fixture(scope="module")
def run_dir(tiny_sd_dir, tmp_path_factory):
    from test_train import tiny_overrides

    from nemo_aligner_draft.cli.train import main

    d = str(tmp_path_factory.mktemp("convert_run") / "draftp")
    assert main(["--config-name=draftp_tiny", *tiny_overrides(tiny_sd_dir, d, steps=2,
                                                              extra=["model.optim.lr=0.05"])]) == 0
    return d


def _pipe(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)


def _render(pipe, latents):
    out = pipe(["a red cube", "a blue ball"], num_inference_steps=4, guidance_scale=3.0, height=64, width=64,
               latents=latents.clone(), output_type="np")
    return torch.from_numpy(out.images)


def test_merged_pipeline_equals_base_plus_lora(run_dir, tiny_sd_dir, tmp_path):
    out = str(tmp_path / "merged")
    assert convert(["to-diffusers", run_dir, out]) == 0
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    merged = _render(_pipe(out), latents)
    with_lora = _pipe(tiny_sd_dir)
    with_lora.load_lora_weights(os.path.join(run_dir, "export"))
    ref = _render(with_lora, latents)
    base = _render(_pipe(tiny_sd_dir), latents)
    # merging changes only float32 rounding (W + ΔW vs W x + ΔW x): 1e-4 on [0, 1] pixels
    assert (merged - ref).abs().max() < 1e-4
    assert (base - ref).abs().max() > 1e-3  # the trained LoRA does change the images


def test_lora_export_from_ckpt_and_nemo_equals_the_runs_export(run_dir, tmp_path):
    from safetensors.torch import load_file

    ckpt = next(f for f in os.listdir(os.path.join(run_dir, "checkpoints")) if f.endswith("-last.ckpt"))
    reference = load_file(os.path.join(run_dir, "export", "pytorch_lora_weights.safetensors"))
    for i, src in enumerate([os.path.join(run_dir, "checkpoints", ckpt),
                             os.path.join(run_dir, "checkpoints", "draftp_tiny.nemo")]):
        out = str(tmp_path / f"lora{i}")
        assert convert(["to-lora", src, out]) == 0
        got = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
        assert set(got) == set(reference)
        assert all(torch.equal(got[k], reference[k]) for k in reference)
    assert any(v.abs().max() > 0 for k, v in reference.items() if "lora_B" in k)  # trained, not the zero init


@pytest.mark.parametrize("layout", ["nemo", "ldm", "nemo_hf"])
def test_nemo_export_then_import_is_the_identity(run_dir, tiny_sd_dir, tmp_path, layout):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    merged = str(tmp_path / "merged")
    nemo = str(tmp_path / "sd.nemo")
    back = str(tmp_path / "back")
    assert convert(["to-diffusers", run_dir, merged]) == 0
    assert convert(["to-nemo", run_dir, nemo, "--layout", layout]) == 0
    assert convert(["from-nemo", nemo, back, "--base", tiny_sd_dir]) == 0
    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        a = cls.from_pretrained(merged, subfolder=sub).state_dict()
        b = cls.from_pretrained(back, subfolder=sub).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), sub
    # the round trip carries the merged (trained) UNet, not a copy of the base
    base_unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet").state_dict()
    merged_unet = UNet2DConditionModel.from_pretrained(back, subfolder="unet").state_dict()
    assert any(not torch.equal(base_unet[k], merged_unet[k]) for k in base_unet)


def test_nemo_aligner_lora_import_matches_parallel_linear_adapter(tiny_sd_dir, tmp_path):
    """NeMo: y = W x + (alpha/r)·linear_out(linear_in(x)). Import, load with diffusers' own
    load_lora_weights, fuse, and compare W_fused − W to (alpha/r)·linear_out @ linear_in."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    keymap = unet_key_map(unet.state_dict().keys(), unet.config, "ldm")
    r, alpha = 4, 2.0
    g = torch.Generator().manual_seed(0)
    nemo, expected = {}, {}
    for key, ldm in keymap.items():
        if not key.endswith((".to_q.weight", ".to_v.weight", ".to_out.0.weight")):
            continue
        w = unet.state_dict()[key]
        # NeMo's adapter sits on the LinearWrapper itself: to_out.0, not the to_out Sequential
        # (attention.py:299-301); attention modules keep their names in NeMo's tree
        module = "model.model.diffusion_model." + ldm[: -len(".weight")]
        a, b = torch.randn(r, w.shape[1], generator=g), torch.randn(w.shape[0], r, generator=g)
        nemo[f"{module}.adapter_layer.parallel_linear_adapter.linear_in.weight"] = a
        nemo[f"{module}.adapter_layer.parallel_linear_adapter.linear_out.weight"] = b
        expected[key] = (alpha / r) * (b.double() @ a.double())
    src = str(tmp_path / "adapters.ckpt")
    torch.save({"state_dict": nemo}, src)
    out = str(tmp_path / "lora")
    assert convert(["from-nemo-lora", src, out, "--base", tiny_sd_dir, "--alpha", str(alpha)]) == 0
    pipe = _pipe(tiny_sd_dir)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(out)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    after = pipe.unet.state_dict()
    assert len(expected) == 24  # 4 transformer blocks × (attn1, attn2) × (to_q, to_v, to_out)
    for key, delta in expected.items():
        got = after[key].double() - before[key].double()
        assert torch.allclose(got, delta, atol=1e-5, rtol=1e-5), key
    untouched = [k for k in before if k not in expected and k in after]
    assert all(torch.equal(before[k], after[k]) for k in untouched)


def test_bad_inputs_give_one_clear_message_and_no_output(run_dir, tiny_sd_dir, tmp_path, capsys):
    import tarfile

    # a .nemo without weights
    cfg = tmp_path / "model_config.yaml"
    cfg.write_text("a: 1\n")
    bad_nemo = str(tmp_path / "bad.nemo")
    with tarfile.open(bad_nemo, "w") as t:
        t.add(str(cfg), arcname="./model_config.yaml")
    out = str(tmp_path / "o1")
    assert convert(["from-nemo", bad_nemo, out, "--base", tiny_sd_dir]) == 2
    assert "model_weights.ckpt" in capsys.readouterr().err and not os.path.exists(out)
    # a checkpoint of another architecture: shapes listed, nothing written
    from diffusers import UNet2DConditionModel

    from nemo_aligner_draft.export.ldm_layout import unet_to_nemo
    from nemo_aligner_draft.testing.tiny import TINY_UNET

    wide = UNet2DConditionModel(**{**TINY_UNET, "block_out_channels": (32, 96)})
    wrong = str(tmp_path / "wide.ckpt")
    torch.save({"model.diffusion_model." + k: v for k, v in unet_to_nemo(wide.state_dict(), wide.config).items()}, wrong)
    out = str(tmp_path / "o2")
    assert convert(["from-nemo", wrong, out, "--base", tiny_sd_dir]) == 2
    err = capsys.readouterr().err
    assert "shape mismatches" in err and "vs expected" in err and not os.path.exists(out)
    # not a training checkpoint
    plain = str(tmp_path / "plain.ckpt")
    torch.save({"w": torch.zeros(1)}, plain)
    assert convert(["to-lora", plain, str(tmp_path / "o3")]) == 2
    assert "alignment_state" in capsys.readouterr().err
    # existing output is never overwritten
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    assert convert(["to-diffusers", run_dir, str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err and os.listdir(existing) == ["keep.txt"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".convert-")]


def test_failure_midway_leaves_no_partial_output(run_dir, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(UNet2DConditionModel, "save_pretrained", boom)
    out = str(tmp_path / "merged")
    with pytest.raises(OSError, match="disk full"):
        convert(["to-diffusers", run_dir, out])  # the base pipeline was already copied when this fails
    assert not os.path.exists(out)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".convert-")]


def test_sdxl_pipeline_to_nemo_and_back(tmp_path):
    """A diffusers SDXL pipeline (add_embedding → label_emb, 2-layer transformer stacks) through the
    NeMo layout and back: UNet and VAE bit-identical."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from nemo_aligner_draft.testing.tiny_sdxl import save_tiny_sdxl

    sdxl = save_tiny_sdxl(str(tmp_path / "sdxl"))
    assert convert(["to-nemo", sdxl, str(tmp_path / "xl.nemo")]) == 0
    assert convert(["from-nemo", str(tmp_path / "xl.nemo"), str(tmp_path / "back"), "--base", sdxl]) == 0
    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        a = cls.from_pretrained(sdxl, subfolder=sub).state_dict()
        b = cls.from_pretrained(str(tmp_path / "back"), subfolder=sub).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), sub
    from nemo_aligner_draft.export.read import read_nemo_archive

    _, weights = read_nemo_archive(str(tmp_path / "xl.nemo"))
    assert "model.model.diffusion_model.label_emb.0.0.weight" in weights  # SDXL's added conditioning


def test_a_run_from_before_sdlora_adapted_the_feed_forward_still_converts(run_dir, tmp_path):
    """sdlora used to adapt the attention projections only; such checkpoints (no ff.net adapters)
    still convert, with exactly their own adapters."""
    import shutil

    from safetensors.torch import load_file

    from nemo_aligner_draft.files import safe_torch_load

    old = tmp_path / "old_run"
    (old / "checkpoints").mkdir(parents=True)
    shutil.copy(os.path.join(run_dir, "config.yaml"), old / "config.yaml")
    ckpt = next(f for f in os.listdir(os.path.join(run_dir, "checkpoints")) if f.endswith("-last.ckpt"))
    raw = safe_torch_load(os.path.join(run_dir, "checkpoints", ckpt))
    raw["state_dict"] = {k: v for k, v in raw["state_dict"].items() if ".ff.net." not in k}
    torch.save(raw, old / "checkpoints" / "step=2-last.ckpt")
    out = str(tmp_path / "lora")
    assert convert(["to-lora", str(old), out]) == 0
    got = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert len(got) == 2 * 4 * 8 and not any(".ff.net." in k for k in got)  # 4 blocks x 8 attention linears
