"""nad-generate end to end on the tiny SD pipeline with random (non-zero) LoRAs saved in the diffusers
format: AIG at w≡0 / w≡1 against the base / fine-tuned runs, soups at α = 1 / 0 against each LoRA
alone, LoRA scale 0 against the base, batch-size invariance, written files and rewards, bad input."""
import json
import os

import pytest
import torch

from nemo_aligner_draft.cli.generate import generate, main, parse_args


def _make_lora(sd_dir, out, rank, alpha, seed):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from nemo_aligner_draft.export.lora import export_lora

    unet = UNet2DConditionModel.from_pretrained(sd_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return os.path.dirname(export_lora(unet, out))


@pytest.fixture(scope="module")
def loras(tiny_sd_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return (_make_lora(tiny_sd_dir, str(d / "a"), 4, 8.0, 1), _make_lora(tiny_sd_dir, str(d / "b"), 2, 2.0, 2))


def _gen(sd_dir, out, *extra):
    args = parse_args(["--model", sd_dir, "--prompt", "a red cube", "a blue ball", "--steps", "3",
                       "--height", "64", "--width", "64", "--cfg", "3.0", "--batch", "2", "--seed", "5",
                       "--out", str(out), *extra])
    return generate(args)["images"]


def test_aig_endpoints_equal_base_and_finetuned(tiny_sd_dir, loras, tmp_path):
    base = _gen(tiny_sd_dir, tmp_path / "base")
    tuned = _gen(tiny_sd_dir, tmp_path / "tuned", "--lora", loras[0])
    aig0 = _gen(tiny_sd_dir, tmp_path / "aig0", "--lora", loras[0], "--aig", "constant_0")
    aig1 = _gen(tiny_sd_dir, tmp_path / "aig1", "--lora", loras[0], "--aig", "constant_1")
    lin = _gen(tiny_sd_dir, tmp_path / "lin", "--lora", loras[0], "--aig", "linear")
    assert (base - tuned).abs().max() > 1e-2  # the LoRA matters, so the checks below can fail
    assert torch.equal(aig0, base)
    assert torch.equal(aig1, tuned)
    assert (lin - base).abs().max() > 1e-4 and (lin - tuned).abs().max() > 1e-4
    rec = json.loads((tmp_path / "lin" / "generation.json").read_text())
    assert rec["aig_weights"] == [0.0, 0.5, 1.0]


def test_soup_endpoints_and_lora_scale_zero(tiny_sd_dir, loras, tmp_path):
    a = _gen(tiny_sd_dir, tmp_path / "a", "--lora", loras[0])
    b = _gen(tiny_sd_dir, tmp_path / "b", "--lora", loras[1])
    s1 = _gen(tiny_sd_dir, tmp_path / "s1", "--soup-lora", loras[0], loras[1], "--soup-alpha", "1")
    s0 = _gen(tiny_sd_dir, tmp_path / "s0", "--soup-lora", loras[0], loras[1], "--soup-alpha", "0")
    half = _gen(tiny_sd_dir, tmp_path / "sh", "--soup-lora", loras[0], loras[1], "--soup-alpha", "0.5")
    # the soup folds alpha/r into B and stacks ranks: the same ΔW up to float32 rounding
    assert (a - b).abs().max() > 1e-2
    assert (s1 - a).abs().max() < 1e-5
    assert (s0 - b).abs().max() < 1e-5
    assert (half - a).abs().max() > 1e-3 and (half - b).abs().max() > 1e-3
    base = _gen(tiny_sd_dir, tmp_path / "base")
    zero = _gen(tiny_sd_dir, tmp_path / "z", "--lora", loras[0], "--lora-scale", "0")
    assert torch.equal(zero, base)


def test_outputs_rewards_and_batch_invariance(tiny_sd_dir, tmp_path):
    from nemo_aligner_draft.rewards import build_reward

    prompts = tmp_path / "p.txt"
    prompts.write_text("# comment\na red cube\n\na blue ball\na green cone\n")
    common = ["--model", tiny_sd_dir, "--prompt-file", str(prompts), "--steps", "2", "--height", "64",
              "--width", "64", "--seed", "3", "--reward", "brightness"]
    r3 = generate(parse_args([*common, "--batch", "3", "--out", str(tmp_path / "b3")]))
    r1 = generate(parse_args([*common, "--batch", "1", "--out", str(tmp_path / "b1")]))
    assert r3["images"].shape == (3, 3, 64, 64)
    assert (r3["images"] - r1["images"]).abs().max() < 1e-5  # image i depends on seed + i only
    rec = json.loads((tmp_path / "b3" / "generation.json").read_text())
    assert [im["prompt"] for im in rec["images"]] == ["a red cube", "a blue ball", "a green cone"]
    assert [im["seed"] for im in rec["images"]] == [3, 4, 5]
    expected = build_reward("brightness")(r3["images"], ["a red cube", "a blue ball", "a green cone"])
    got = torch.tensor([im["reward"] for im in rec["images"]])
    assert torch.allclose(got, expected.float().reshape(-1), atol=1e-6)
    files = sorted(os.listdir(tmp_path / "b3" / "images"))
    assert files == ["00000.png", "00001.png", "00002.png"]
    from PIL import Image

    assert Image.open(tmp_path / "b3" / "grid.png").size == (128, 128)  # 2×2 grid of 64 px images


def test_bad_input(tiny_sd_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--model", tiny_sd_dir, "--prompt", "x", "--aig", "linear", "--out", str(tmp_path)])
    assert "--aig needs" in capsys.readouterr().err
    assert main(["--model", tiny_sd_dir, "--prompt-file", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "none.txt" in capsys.readouterr().err
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    from safetensors.torch import save_file

    save_file({"unet.down_blocks.9.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 4),
               "unet.down_blocks.9.attentions.0.proj_in.lora_B.weight": torch.zeros(4, 2)},
              str(bogus / "pytorch_lora_weights.safetensors"))
    assert main(["--model", tiny_sd_dir, "--prompt", "x", "--lora", str(bogus), "--steps", "1", "--height", "64",
                 "--width", "64", "--out", str(tmp_path / "o2")]) == 2
    assert "down_blocks.9.attentions.0.proj_in" in capsys.readouterr().err
    assert main(["--model", tiny_sd_dir, "--prompt", "x", "--lora", str(tmp_path / "o"), "--steps", "1",
                 "--out", str(tmp_path / "o3")]) == 2


def test_sdxl_lora_and_aig_endpoints(tmp_path):
    """The same CLI path on the SDXL backend (two text encoders, added conditioning, Euler)."""
    from nemo_aligner_draft.testing.tiny_sdxl import save_tiny_sdxl

    sdxl = save_tiny_sdxl(str(tmp_path / "sdxl"))
    lora = _make_lora(sdxl, str(tmp_path / "lora"), 4, 4.0, 3)
    base = _gen(sdxl, tmp_path / "base")
    tuned = _gen(sdxl, tmp_path / "tuned", "--lora", lora)
    aig1 = _gen(sdxl, tmp_path / "aig1", "--lora", lora, "--aig", "constant_1")
    aig0 = _gen(sdxl, tmp_path / "aig0", "--lora", lora, "--aig", "constant_0")
    assert (base - tuned).abs().max() > 1e-3
    assert torch.equal(aig1, tuned) and torch.equal(aig0, base)


def test_bad_input_names_the_flag(tiny_sd_dir, tmp_path, capsys):
    """Each failure names the flag whose value caused it; a file a library cannot parse (a truncated
    safetensors file) is one line too, not a traceback; nothing is written."""
    out = tmp_path / "o"
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    cases = [
        (["--model", str(tmp_path / "nope")], "--model: "),
        (["--model", str(tmp_path)], "--model: "),
        (["--model", tiny_sd_dir, "--lora", str(broken)], "--lora: "),
        (["--model", tiny_sd_dir, "--reward", "no_such_reward"], "--reward: unknown reward 'no_such_reward'"),
    ]
    for args, expect in cases:
        rc = main([*args, "--prompt", "x", "--steps", "1", "--height", "64", "--width", "64", "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2, (args, err[-1500:])
        lines = [ln for ln in err.splitlines() if "error:" in ln]
        assert len(lines) == 1 and expect in lines[0], (args, err[-1500:])
        assert "Traceback" not in err
        assert not out.exists(), args


@pytest.fixture(scope="module")
def same_rank_loras(tiny_sd_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras_r4")
    return (_make_lora(tiny_sd_dir, str(d / "a"), 4, 4.0, 5), _make_lora(tiny_sd_dir, str(d / "b"), 4, 4.0, 6))


def test_factors_soup_is_alignprops_mixing(tiny_sd_dir, same_rank_loras, tmp_path):
    """``--soup-mode factors`` mixes A and B factor by factor (AlignProp's evaluate_soup): against the base
    (``base``, AlignProp's "stablediffusion") ΔW = α²·ΔW_A, i.e. the LoRA at scale α²; the delta soup gives
    α·ΔW_A. With two LoRAs α = 1 / 0 are A / B, and α = 0.5 is not the delta soup (the cross terms)."""
    a, b = same_rank_loras

    def gen(name, *extra):
        return _gen(tiny_sd_dir, tmp_path / name, *extra)

    factors = gen("f", "--soup-lora", a, "base", "--soup-mode", "factors", "--soup-alpha", "0.5")
    delta = gen("d", "--soup-lora", a, "base", "--soup-alpha", "0.5")
    quarter, half = gen("q", "--lora", a, "--lora-scale", "0.25"), gen("h", "--lora", a, "--lora-scale", "0.5")
    assert (quarter - half).abs().max() > 1e-3  # the scales differ visibly, so the checks below can fail
    assert (factors - quarter).abs().max() < 1e-5 and (delta - half).abs().max() < 1e-5
    one = gen("f1", "--soup-lora", a, b, "--soup-mode", "factors", "--soup-alpha", "1")
    zero = gen("f0", "--soup-lora", a, b, "--soup-mode", "factors", "--soup-alpha", "0")
    mid = gen("fm", "--soup-lora", a, b, "--soup-mode", "factors", "--soup-alpha", "0.5")
    mid_delta = gen("dm", "--soup-lora", a, b, "--soup-alpha", "0.5")
    assert (one - gen("a", "--lora", a)).abs().max() < 1e-5 and (zero - gen("b", "--lora", b)).abs().max() < 1e-5
    assert (mid - mid_delta).abs().max() > 1e-4
    rec = json.loads((tmp_path / "f" / "generation.json").read_text())
    assert rec["finetuned"]["soup"][1] == "base" and rec["finetuned"]["soup_mode"] == "factors"


def test_config_renders_what_validation_renders(tiny_sd_dir, same_rank_loras, tmp_path):
    """``--config-name alignprop_evaluate_soup``: the shipped file with paths and sizes overridden gives the
    images of the same settings as flags, limit_val_batches × micro_batch_size of them from the prompt file
    (repeated), soup alpha/mode from the file, scored by the file's reward; every key of the file is read."""
    import yaml

    from nemo_aligner_draft.rewards import build_reward
    from nemo_aligner_draft.testing.config import yaml_leaves
    from nemo_aligner_draft.testing.tiny import save_tiny_aesthetic
    from nemo_aligner_draft.typed import track_reads

    a, _ = same_rank_loras
    clip, head = save_tiny_aesthetic(str(tmp_path / "rm"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue ball\na green cone\n")
    overrides = [f"model.pretrained={tiny_sd_dir}", f"model.data.train.dataset_path={prompts}",
                 f"rm.model.restore_from_path={head}", f"rm.kwargs.clip_path={clip}", "model.infer.inference_steps=3",
                 "model.infer.height=64", "model.infer.width=64", "model.micro_batch_size=2",
                 "model.global_batch_size=2", "trainer.alignprop.limit_val_batches=2", "soup.alpha=0.5"]
    with track_reads() as reads:
        got = generate(parse_args(["--config-name", "alignprop_evaluate_soup", "--soup-lora", a, "base",
                                   "--out", str(tmp_path / "cfg"), *overrides]))
    four = ["a red cube", "a blue ball", "a green cone", "a red cube"]
    flags = generate(parse_args(["--model", tiny_sd_dir, "--prompt", *four, "--steps", "3", "--height", "64",
                                 "--width", "64", "--cfg", "7.5", "--sampler", "ddim", "--batch", "2", "--seed", "42",
                                 "--soup-lora", a, "base", "--soup-mode", "factors", "--soup-alpha", "0.5",
                                 "--out", str(tmp_path / "flags")]))
    assert torch.equal(got["images"], flags["images"])
    rec = got["record"]
    assert [im["prompt"] for im in rec["images"]] == four and [im["seed"] for im in rec["images"]] == [42, 43, 44, 45]
    assert (rec["finetuned"]["soup_alpha"], rec["finetuned"]["soup_mode"]) == (0.5, "factors")
    expected = build_reward("aesthetic", path=head, clip_path=clip)(got["images"], four)
    assert torch.allclose(got["rewards"], expected.float(), atol=1e-5)
    assert rec["settings"]["name"] == rec["settings"]["config_name"] == "alignprop_evaluate_soup"
    assert "_rm" not in rec["settings"]
    conf = os.path.join(os.path.dirname(__file__), "..", "..", "conf", "alignprop_evaluate_soup.yaml")
    raw = yaml.safe_load(open(conf))
    unread = sorted(k for k in yaml_leaves(raw) if k not in set(reads))
    assert not unread, f"keys nothing read: {unread}"


def test_config_refuses_the_flags_it_sets(tiny_sd_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--config-name", "alignprop_evaluate", "--steps", "3", "--out", str(tmp_path)])
    assert "--steps is set by --config-name (its model.infer.inference_steps)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["model.seed=3", "--model", tiny_sd_dir, "--prompt", "x", "--out", str(tmp_path)])
    assert "need --config-name" in capsys.readouterr().err
    # a missing required path is one line naming its key, nothing written
    rc = main(["--config-name", "alignprop_evaluate", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "model.pretrained" in err and "Traceback" not in err and not (tmp_path / "o").exists()
