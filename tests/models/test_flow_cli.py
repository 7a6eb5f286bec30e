"""DRaFT+ and GRPO on the flow-matching families through the real CLI (Hydra → schema → NeMo shell → run
dir), on tiny random pipelines saved in the real diffusers layouts (``testing/tiny_flux.py``,
``testing/tiny_sd3.py``): one cell per family × algorithm, each a short run of its shipped ``*_tiny``
config, checking the run directory, the method's metrics, that every key in the yaml was read, and that
the exported LoRA loads into the plain diffusers pipeline and reproduces the trained model's image. Then
the bad inputs of the families: a sampler that does not fit, and guidance on a FLUX model without a
guidance embedding. Last, on one trained DRaFT+ run per family (the ``trained`` fixture): its LoRA and its
merged pipeline export in plain diffusers, nad-generate with LoRA scale and soups, and the .nemo
converters' one-line refusal of a flow pipeline.
"""
import json
import os

import pytest
import torch
import yaml

from nemo_aligner_draft.testing.config import yaml_leaves

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# config -> (family, loop section, optimizer steps, overrides); GRPO: 2 epochs of 2 optimizer steps, validated
# after the second (its val_check_interval counts epochs)
CELLS = {
    "draftp_flux_tiny": ("flux", "draftp_sd", 2, []),
    "grpo_flux_tiny": ("flux", "grpo", 4, ["model.infer.inference_steps=4", "model.grpo.rollout_steps=3"]),
    "draftp_sd3_tiny": ("sd3", "draftp_sd", 2, []),
    "grpo_sd3_tiny": ("sd3", "grpo", 4, ["model.infer.inference_steps=4", "model.grpo.rollout_steps=3"]),
}


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    from nemo_aligner_draft.testing.tiny_flux import save_tiny_flux

    return save_tiny_flux(str(tmp_path_factory.mktemp("flux") / "pipe"))


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    from nemo_aligner_draft.testing.tiny_sd3 import save_tiny_sd3

    return save_tiny_sd3(str(tmp_path_factory.mktemp("sd3") / "pipe"))


@pytest.fixture(scope="module")
def pipelines(flux_dir, sd3_dir):
    return {"flux": flux_dir, "sd3": sd3_dir}


def _args(name, pipe, run, steps, loop, extra):
    return [f"--config-name={name}", f"model.pretrained={pipe}", f"exp_manager.explicit_log_dir={run}",
            f"trainer.max_steps={steps}", f"trainer.{loop}.max_steps={steps}",
            f"trainer.{loop}.val_check_interval={steps // 2 if loop == 'grpo' else steps}",
            f"trainer.{loop}.save_interval={steps}",
            f"trainer.{loop}.limit_val_batches=1", "exp_manager.create_tensorboard_logger=false", *extra]


@pytest.mark.parametrize("name", sorted(CELLS))
def test_flow_family_cell_trains_and_exports(name, pipelines, tmp_path):
    from nemo_aligner_draft.cli.train import main
    from nemo_aligner_draft.typed import track_reads

    family, loop, steps, extra = CELLS[name]
    run = tmp_path / "run"
    with track_reads() as reads:
        assert main(_args(name, pipelines[family], run, steps, loop, extra)) == 0
    raw = yaml.safe_load(open(os.path.join(REPO, "conf", name + ".yaml")))
    unread = sorted(k for k in yaml_leaves(raw) if k not in set(reads))
    assert not unread, f"{name}: config keys nothing read: {unread}"
    metrics = json.load(open(run / "metrics.json"))
    last = metrics["train"][-1]
    assert last["step"] == steps and torch.isfinite(torch.tensor(last["train_loss"]))
    assert ("kl" in last and "clipfrac" in last) if loop == "grpo" else ("kl_penalty" in last)
    assert last["grad_norm"] > 0, "the LoRA received a gradient"
    cfg = yaml.safe_load(open(run / "config.yaml"))
    assert cfg["model"]["algorithm"] == ("grpo" if loop == "grpo" else "draftp")
    assert os.path.isfile(run / "export" / "pytorch_lora_weights.safetensors")
    val = metrics["validation"][-1]
    assert val["rewards_tuned"] != val["rewards_base"], "the trained LoRA changed the validation images"


def test_flow_sampler_on_a_noise_prediction_model_is_one_line(tiny_sd_dir, tmp_path, capsys):
    from nemo_aligner_draft.cli.train import main

    rc = main(["--config-name=draftp_tiny", f"model.pretrained={tiny_sd_dir}", f"exp_manager.explicit_log_dir={tmp_path}/r",
               "model.infer.sampler=flow", "trainer.max_steps=1", "trainer.draftp_sd.max_steps=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.infer.sampler" in err and "'sd' model family" in err and "Traceback" not in err


def test_guidance_on_flux_without_guidance_embedding_is_one_line(tmp_path, capsys):
    from nemo_aligner_draft.cli.train import main
    from nemo_aligner_draft.testing.tiny_flux import save_tiny_flux

    schnell = save_tiny_flux(str(tmp_path / "schnell"), guidance_embeds=False)
    rc = main(["--config-name=draftp_flux_tiny", f"model.pretrained={schnell}", f"exp_manager.explicit_log_dir={tmp_path}/r",
               "trainer.max_steps=1", "trainer.draftp_sd.max_steps=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.infer.unconditional_guidance_scale" in err and "no guidance embedding" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("config,family,other", [("draftp_sd3_tiny", "sd3", "flux"), ("grpo_flux_tiny", "flux", "sd3")])
def test_a_directory_of_the_other_flow_family_is_one_line(config, family, other, pipelines, tmp_path, capsys):
    """A FLUX directory under an SD3 config with ``model.family=sd3`` (and the reverse): exit 2, one line that
    names the key or path and the pipeline class model_index.json names, nothing written."""
    from nemo_aligner_draft.cli.train import main

    run = tmp_path / "r"
    rc = main([f"--config-name={config}", f"model.pretrained={pipelines[other]}", f"model.family={family}",
               f"exp_manager.explicit_log_dir={run}", "trainer.max_steps=1"])
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2 and "Traceback" not in err and len(ours) == 1, err
    assert "model.family" in ours[0] and f"holds a '{other}'-family pipeline" in ours[0], ours[0]
    assert not run.exists() or not any(run.rglob("*.ckpt"))


@pytest.fixture(scope="module")
def trained(pipelines, tmp_path_factory):
    """family -> the run directory of a short DRaFT+ run (lr 0.05, so the LoRA moves the images)."""
    from nemo_aligner_draft.cli.train import main

    runs = {}
    for family in ("flux", "sd3"):
        name = f"draftp_{family}_tiny"
        _, loop, steps, extra = CELLS[name]
        run = tmp_path_factory.mktemp(f"trained_{family}") / "run"
        assert main(_args(name, pipelines[family], run, steps, loop, [*extra, "model.optim.lr=0.05"])) == 0
        runs[family] = str(run)
    return runs


GUIDANCE = {"flux": 3.5, "sd3": 4.5}  # FLUX.1-dev's embedded guidance; SD3's classifier-free scale
PROMPT = ["a red circle"]


def _trained_latents(family, pipelines, run):
    """Our backend with the run's exported LoRA applied (what nad-generate --lora does): (final latents of the
    deterministic 4-step flow sampler from seed-0 initial latents at 64 px, those initial latents, T5 length)."""
    from nemo_aligner_draft.backends import load_backend
    from nemo_aligner_draft.core.sampler import StepPlan, sample
    from nemo_aligner_draft.export.lora_io import apply_lora, read_lora

    backend = load_backend(pipelines[family], family)
    state, lcfg = read_lora(os.path.join(run, "export"))
    apply_lora(backend.net, state, int(lcfg["r"]), float(lcfg["lora_alpha"]))
    backend.set_resolution(64, 64)
    rule = backend.step_rule(4)
    x = backend.initial_latents(1, 64, 64, rule, generator=torch.Generator().manual_seed(0))
    ours = sample(backend.denoiser(backend.encode_prompts(PROMPT), GUIDANCE[family]), rule, x,
                  StepPlan.no_grad(4)).latents
    return ours, x, backend.max_sequence_length


def _diffusers_latents(family, pipe, x, max_sequence_length):
    """The plain diffusers pipeline's final latents from our initial latents ``x`` (FLUX: packed and back)."""
    from nemo_aligner_draft.backends.flux import pack_latents, unpack_latents

    h, w = x.shape[2] * 8, x.shape[3] * 8
    out = pipe(PROMPT, latents=pack_latents(x) if family == "flux" else x.clone(), num_inference_steps=4,
               guidance_scale=GUIDANCE[family], height=h, width=w, output_type="latent",
               max_sequence_length=max_sequence_length).images
    return unpack_latents(out, x.shape[2], x.shape[3]) if family == "flux" else out


def _pipeline_class(family):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    return FluxPipeline if family == "flux" else StableDiffusion3Pipeline


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_exported_lora_reproduces_the_trained_model_in_diffusers(family, pipelines, trained):
    """The run's LoRA export, loaded with FluxPipeline / StableDiffusion3Pipeline.load_lora_weights, draws what
    our backend with the trained adapters draws from the same latents (deterministic flow sampler; FLUX: the
    guidance embedding; SD3: classifier-free guidance 4.5, CLIP-L + CLIP-G + T5 conditioning, the empty
    negative prompt)."""
    ours, x, seq = _trained_latents(family, pipelines, trained[family])
    pipe = _pipeline_class(family).from_pretrained(pipelines[family])
    pipe.load_lora_weights(os.path.join(trained[family], "export"))
    torch.testing.assert_close(_diffusers_latents(family, pipe, x, seq), ours, rtol=1e-4, atol=1e-5)
    plain = _diffusers_latents(family, _pipeline_class(family).from_pretrained(pipelines[family]), x, seq)
    assert (plain - ours).abs().max() > 1e-4, "the LoRA changes the image"


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_merged_pipeline_export_draws_the_trained_model_in_diffusers(family, pipelines, trained, tmp_path):
    """nad-convert to-diffusers on a flow run: the LoRA is folded into transformer/ (no peft keys left) and
    the plain FluxPipeline / StableDiffusion3Pipeline loaded from the merged directory draws what our backend
    with the run's adapters draws from the same latents (merging changes float32 rounding only)."""
    from safetensors.torch import load_file

    from nemo_aligner_draft.cli.convert import main as convert

    out = str(tmp_path / "merged")
    assert convert(["to-diffusers", trained[family], out]) == 0
    weights = load_file(os.path.join(out, "transformer", "diffusion_pytorch_model.safetensors"))
    assert not [k for k in weights if "lora" in k]
    cls = _pipeline_class(family)
    assert json.load(open(os.path.join(out, "model_index.json")))["_class_name"] == cls.__name__
    ours, x, seq = _trained_latents(family, pipelines, trained[family])
    torch.testing.assert_close(_diffusers_latents(family, cls.from_pretrained(out), x, seq), ours, rtol=1e-4, atol=1e-5)
    base = _diffusers_latents(family, cls.from_pretrained(pipelines[family]), x, seq)
    assert (base - ours).abs().max() > 1e-4, "the merged LoRA changes the image"


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_nad_generate_draws_with_lora_scale_soup_and_merged_export(family, pipelines, trained, tmp_path):
    """nad-generate on a FLUX / SD3 directory with a trained run's LoRA: --lora-scale 0 draws the base model's
    images exactly, the LoRA draws other ones, the soup with the base at alpha 0.5 equals --lora-scale 0.5
    (both are half the update ΔW), and the merged export draws the --lora images."""
    from nemo_aligner_draft.cli.convert import main as convert
    from nemo_aligner_draft.cli.generate import generate, parse_args

    lora_dir = os.path.join(trained[family], "export")
    common = ["--prompt", "a red circle", "a blue square", "--steps", "4", "--cfg", str(GUIDANCE[family]),
              "--height", "64", "--width", "64", "--device", "cpu"]

    def draw(name, model, *more):
        return generate(parse_args(["--model", model, *common, "--out", str(tmp_path / name), *more]))["images"]

    base = draw("base", pipelines[family])
    lora = draw("lora", pipelines[family], "--lora", lora_dir)
    zero = draw("zero", pipelines[family], "--lora", lora_dir, "--lora-scale", "0")
    half = draw("half", pipelines[family], "--lora", lora_dir, "--lora-scale", "0.5")
    soup = draw("soup", pipelines[family], "--soup-lora", lora_dir, "base", "--soup-alpha", "0.5")
    torch.testing.assert_close(zero, base)
    assert (lora - base).abs().max() > 1e-3
    torch.testing.assert_close(soup, half, rtol=1e-4, atol=1e-5)
    assert (half - base).abs().max() > 0 and (half - lora).abs().max() > 0
    assert convert(["to-diffusers", trained[family], str(tmp_path / "merged")]) == 0
    torch.testing.assert_close(draw("merged", str(tmp_path / "merged")), lora, rtol=1e-4, atol=1e-4)



@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_nemo_converters_refuse_a_flow_family_in_one_line(family, pipelines, trained, tmp_path, capsys):
    """NeMo had SD / SDXL checkpoints only: to-nemo (of a run or of the pipeline), to-nemo-lora and the
    from-nemo directions with a flow pipeline as --base name the pipeline class and what converts it; nothing
    is written."""
    from nemo_aligner_draft.cli.convert import main as convert

    fake = tmp_path / "any.nemo"
    fake.write_bytes(b"not read: the base is refused first")
    calls = [["to-nemo", trained[family], str(tmp_path / "a.nemo")],
             ["to-nemo", pipelines[family], str(tmp_path / "b.nemo")],
             ["to-nemo-lora", trained[family], str(tmp_path / "c.nemo")],
             ["from-nemo", str(fake), str(tmp_path / "d"), "--base", pipelines[family]],
             ["from-nemo-lora", str(fake), str(tmp_path / "e"), "--base", pipelines[family]]]
    cls = "FluxPipeline" if family == "flux" else "StableDiffusion3Pipeline"
    for argv in calls:
        assert convert(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and cls in err and "SD and SDXL UNets only" in err, (argv, err)
        assert "to-diffusers or to-lora" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["any.nemo"]
