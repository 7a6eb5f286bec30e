"""SDXL through the same CLI, model class and export as SD (no SDXL twin of the training code)."""
import json
import os

import pytest


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    from nemo_aligner_draft.testing.tiny_sdxl import save_tiny_sdxl

    return save_tiny_sdxl(str(tmp_path_factory.mktemp("tiny_sdxl")))


def test_draftp_sdxl_trains_from_the_cli_and_exports_lora(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from nemo_aligner_draft.cli.train import main
    from nemo_aligner_draft.typed import track_reads

    run = tmp_path / "run"
    with track_reads() as reads:
        rc = main(["--config-name=draftp_sdxl", f"model.pretrained={tiny_sdxl}", f"exp_manager.explicit_log_dir={run}",
                   "model.data.train.dataset_path=builtin:animals", "rm.name=brightness",
                   "rm.model.restore_from_path=null", "trainer.precision=32", "trainer.accelerator=cpu",
                   "trainer.max_steps=3", "trainer.draftp_sd.max_steps=3", "trainer.draftp_sd.val_check_interval=3",
                   "trainer.draftp_sd.save_interval=3", "model.infer.height=64", "model.infer.width=64",
                   "model.infer.inference_steps=4", "model.global_batch_size=2", "model.micro_batch_size=2",
                   "model.optim.name=adamw", "model.peft.lora_tuning.adapter_dim=4",
                   "model.peft.lora_tuning.network_alpha=4", "model.truncation_steps=2"])
    assert rc == 0
    metrics = json.load(open(run / "metrics.json"))
    assert [h["step"] for h in metrics["train"]] == [1, 2, 3]
    assert metrics["train"][-1]["kl_penalty"] > 0, "the EDM-d penalty is computed against the adapters-off reference"
    assert metrics["validation"][0]["reward_tuned"] != metrics["validation"][0]["reward_base"]
    # the SDXL entry read the SDXL-specific key settings (activation checkpointing) too
    assert "model.activation_checkpointing" in reads and "model.infer.sampler" in reads
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    pipe.load_lora_weights(os.path.join(run, "export"))  # diffusers accepts the exported SDXL LoRA
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())


def test_grpo_on_sdxl_through_the_cli_on_the_ddim_sde(tiny_sdxl, tmp_path):
    """The SDXL × GRPO cell: grpo_sd_tiny's recipe on the SDXL pipeline (its added time ids and pooled text
    embeds in every rollout and train call), on the DDIM SDE; rollouts on 3 steps, validation on 4."""
    from diffusers import StableDiffusionXLPipeline

    from nemo_aligner_draft.cli.train import main

    run = tmp_path / "run"
    rc = main(["--config-name=grpo_sd_tiny", f"model.pretrained={tiny_sdxl}", f"exp_manager.explicit_log_dir={run}",
               "trainer.max_steps=4", "trainer.grpo.max_steps=4", "trainer.grpo.val_check_interval=2",
               "trainer.grpo.save_interval=4", "trainer.grpo.limit_val_batches=1",
               "exp_manager.create_tensorboard_logger=false", "model.infer.inference_steps=4",
               "model.grpo.rollout_steps=3"])
    assert rc == 0
    cfg = json.load(open(run / "metrics.json"))
    last = cfg["train"][-1]
    assert last["step"] == 4 and last["grad_norm"] > 0 and "kl" in last and "clipfrac" in last
    val = cfg["validation"][-1]
    assert val["rewards_tuned"] != val["rewards_base"], "the trained LoRA changed the validation images"
    import yaml

    saved = yaml.safe_load(open(run / "config.yaml"))
    assert (saved["model"]["algorithm"], saved["model"]["infer"]["sampler"]) == ("grpo", "ddim")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    pipe.load_lora_weights(os.path.join(run, "export"))
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())
