"""Every key of conf/draftp_tiny.yaml that shapes a training step has an effect, not only a read.

``test_every_key_in_the_tiny_config_is_read`` (tests/cli/test_train.py) proves that code reads each key;
here each key that acts on the first optimizer step is changed on its own, the model is built as the CLI
builds it, and one micro-batch's loss and LoRA gradient must differ from the unchanged config's. The LoRA
B factors are set to the same seeded random values in every build, so the policy differs from its
reference and the DRaFT+ penalty (``kl_coeff``) is not zero at the first step.

Keys that cannot change the first step are listed in ``NOT_ON_THE_FIRST_STEP`` with the test that covers
their effect instead; a key of the file in neither list fails the last test.
"""
import os

import pytest
import torch
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONF = os.path.join(REPO, "conf")

# key -> the value it is changed to (draftp_tiny.yaml's own value is the baseline)
CHANGES = {
    "model.seed": 7,
    "model.micro_batch_size": 2,
    "model.kl_coeff": 3.0,
    "model.truncation_steps": 3,
    "model.lv_copies": 2,
    "model.decode_target": "x0",
    "model.infer.unconditional_guidance_scale": 6.0,
    "model.infer.height": 32,
    "model.infer.width": 32,
    "model.infer.inference_steps": 6,
    "model.infer.eta": 0.5,
    "model.infer.sampler": "euler",
    "model.peft.peft_scheme": "lora",
    "model.peft.lora_tuning.adapter_dim": 8,
    "model.peft.lora_tuning.network_alpha": 16,
    "model.peft.lora_tuning.target_modules": ["to_q", "to_v"],
    "model.data.train.dataset_path": "builtin:embedded_train",
    "rm.name": "brightness",
}
# key -> where its effect is tested (it cannot change one micro-batch's loss or gradient)
NOT_ON_THE_FIRST_STEP = {
    "name": "tests/cli/test_train.py (the .nemo file name)",
    "model.algorithm": "tests/models/test_methods_cli.py (each algorithm's metrics)",
    "model.pretrained": "tests/backends (the pipeline loaded)",
    "model.family": "tests/reliability/test_bad_inputs.py (family forced against the pipeline)",
    "model.global_batch_size": "tests/distributed (accumulation equals data parallelism)",
    "model.sampler_checkpointing": "tests/core/test_sampler_grad.py (bit-identical gradients by design)",
    "model.activation_checkpointing": "tests/backends/test_sd_backend.py (same gradients, recomputed)",
    "model.nan_tolerance": "tests/reliability/test_nan_guard.py",
    "model.infer.vae_batch_size": "tests/backends/test_sd_backend.py (chunked decoding, same images)",
    "model.optim.name": "tests/cli/test_train.py (lr=0 control)",
    "model.optim.lr": "tests/cli/test_train.py (lr=0 control)",
    "model.optim.weight_decay": "an optimizer step, not the gradient",
    "model.optim.betas": "an optimizer step, not the gradient",
    "model.optim.sched.warmup_steps": "the logged lr (tests/cli/test_train.py)",
    "model.data.validation.dataset_path": "validation prompts (tests/models/test_methods_embedded.py)",
    "model.data.max_prompt_chars": "tests/reliability/test_bad_inputs.py (over-long lines)",
    "rm.model.restore_from_path": "tests/rewards (weights loaded from the path)",
    "rm.fp32": "tests/rewards/test_clip_rewards.py (fp32 under bf16 autocast)",
    "rm.kwargs": "tests/rewards/test_weighted.py",
    "rm.components": "tests/rewards/test_weighted.py",
}


def _build(tiny_sd_dir, change=None):
    from omegaconf import OmegaConf

    from nemo_aligner_draft.cli.train import build_reward_from_config, compose
    from nemo_aligner_draft.config import load_config
    from nemo_aligner_draft.data.prompts import load_prompts
    from nemo_aligner_draft.models.base import AlignmentModel
    from nemo_aligner_draft.typed import track_reads

    overrides = [f"model.pretrained={tiny_sd_dir}", "model.infer.inference_steps=4"]
    if change is not None:
        key, value = change
        overrides.append(f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    dict_cfg = compose(CONF, "draftp_tiny", overrides)
    cfg = load_config(dict_cfg)
    with track_reads() as reads:
        model = AlignmentModel(cfg=OmegaConf.create(OmegaConf.to_container(dict_cfg.model, resolve=True)),
                               config=cfg.model, loop=cfg.loop, reward=build_reward_from_config(cfg.rm),
                               train_prompts=load_prompts(cfg.model.data.train.dataset_path), precision="32")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in sorted(model.backend.net.named_parameters()):
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        batch = next(iter(model.train_dataloader()))
        loss, _ = model.recipe.objective(list(batch["prompt"]), 0)
        loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.backend.trainable_parameters() if p.grad is not None])
    return float(loss), grads, reads


@pytest.fixture(scope="module")
def baseline(tiny_sd_dir):
    return _build(tiny_sd_dir)


@pytest.mark.parametrize("key", sorted(CHANGES))
def test_key_changes_the_first_step(key, baseline, tiny_sd_dir):
    loss0, grads0, _ = baseline
    loss, grads, reads = _build(tiny_sd_dir, (key, CHANGES[key]))
    assert key in reads, f"{key} was not read"
    same_grads = grads.shape == grads0.shape and torch.allclose(grads, grads0, rtol=1e-6, atol=0)
    assert loss != loss0 or not same_grads, f"{key}={CHANGES[key]!r} changed neither the loss nor the gradient"


def test_every_key_of_the_file_is_classified():
    from nemo_aligner_draft.testing.config import yaml_leaves

    raw = yaml.safe_load(open(os.path.join(CONF, "draftp_tiny.yaml")))
    keys = {k for k in yaml_leaves(raw) if not k.startswith(("trainer.", "exp_manager."))}
    unclassified = sorted(keys - set(CHANGES) - set(NOT_ON_THE_FIRST_STEP))
    assert not unclassified, f"keys with neither an effect test nor a reason: {unclassified}"
    assert not set(CHANGES) & set(NOT_ON_THE_FIRST_STEP)
