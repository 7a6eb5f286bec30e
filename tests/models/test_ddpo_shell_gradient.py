"""The first optimizer step of a DDPO epoch, run by the real shell (``AlignmentModel`` under the CLI's
Lightning ``Trainer``: ``training_step`` → ``DDPORecipe.collect`` → ``_train_passes`` → ``OptimizerStep``),
takes the REINFORCE gradient written out here from the DDIM formulas.

Nothing in the reference uses the package's sampler, step rule, log-prob or loss: from the stored
trajectory (x_i, x_{i+1}) of each sample and step of the first optimizer step's window, the test
recomputes the classifier-free-guided ε with a float64 copy of the policy UNet, the DDIM-step Gaussian
(Song et al. 2021, eq. 12; ᾱ and the timesteps from the pipeline's scheduler config, σ from eta) and
its log-density averaged over latent dimensions, and autograds

    L = −mean_{(b, i) ∈ window} A_b · exp(log π(x_{i+1} | x_i) − log π(x_{i+1} | x_i).detach())

(at ratio 1 the PPO-clip gradient is REINFORCE's −A ∇log π), A the shell's advantages clipped to
±adv_clip_max. The window is the first ``micro_batch_size`` samples of the shuffled order (the shell's
rule: one optimizer step per sample batch's worth of samples, accumulated over train micro-batches).
The shell's gradient is read at the start of ``OptimizerStep.finish``, before norm clipping and the step.
"""
import copy
import json
import math
import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONF = os.path.join(REPO, "conf")

ETA = 0.7  # not 1, so a missing eta factor in σ would show
ADV_CLIP = 0.8  # small enough that some advantages are clipped
TOLERANCE = 1e-4  # relative error per LoRA tensor, shell (fp32) against the float64 reference
OVERRIDES = [
    "model.infer.inference_steps=4", f"model.infer.eta={ETA}", "model.micro_batch_size=4",
    "model.global_batch_size=4", "model.ddpo.num_sample_batches=2", "model.ddpo.train_micro_batch_size=2",
    "model.ddpo.timestep_fraction=0.5", f"model.ddpo.adv_clip_max={ADV_CLIP}", "trainer.ddpo.val_check_interval=0",
    # LoRA B nonzero, so the A factors have a gradient too
    "model.peft.lora_tuning.row_init_method=normal",
]


@pytest.fixture(scope="module")
def shell_epoch(tiny_sd_dir):
    """One PPO epoch through the shell; returns what the reference needs and the shell's first gradient."""
    from omegaconf import OmegaConf

    from nemo_aligner_draft.algorithms import policy_gradient
    from nemo_aligner_draft.algorithms.optimizer_step import OptimizerStep
    from nemo_aligner_draft.cli.train import build_reward_from_config, build_trainer, compose
    from nemo_aligner_draft.config import load_config
    from nemo_aligner_draft.data.prompts import load_prompts
    from nemo_aligner_draft.models.base import AlignmentModel

    dict_cfg = compose(CONF, "ddpo_tiny", [f"model.pretrained={tiny_sd_dir}", *OVERRIDES])
    cfg = load_config(dict_cfg)
    model = AlignmentModel(cfg=OmegaConf.create(OmegaConf.to_container(dict_cfg.model, resolve=True)),
                           config=cfg.model, loop=cfg.loop, reward=build_reward_from_config(cfg.rm),
                           train_prompts=load_prompts(cfg.model.data.train.dataset_path), precision="32")
    net = model.backend.net
    lora = {n: p for n, p in net.named_parameters() if "lora_" in n}
    assert {id(p) for p in model.backend.trainable_parameters()} == {id(p) for p in lora.values()}
    policy64 = copy.deepcopy(net).double()  # the weights the rollout samples with (no step before window 1)
    text64 = copy.deepcopy(model.backend.text_encoders[0]).double()

    seen = {"rollouts": [], "batches": [], "grads": [], "logs": []}
    rollout, collect, advantages = (policy_gradient.ddpo_rollout, policy_gradient.DDPORecipe.collect,
                                    policy_gradient.DDPORecipe.advantages)
    minibatches, finish = policy_gradient.iter_train_minibatches, OptimizerStep.finish

    def record_rollout(*args, **kwargs):
        out = rollout(*args, **kwargs)
        seen["rollouts"].append(out)
        return out

    def record_collect(self, chunks, epoch_round):
        out = collect(self, chunks, epoch_round)
        seen["prompts"] = list(out[0])
        return out

    def record_advantages(self, prompts, rewards):
        out = advantages(self, prompts, rewards)
        seen["advantages"] = out.detach().clone()
        return out

    def record_minibatches(*args, **kwargs):
        batches = list(minibatches(*args, **kwargs))
        seen["batches"].append(batches)
        return iter(batches)

    def record_finish(self, extra=None):
        if not seen["grads"]:
            seen["weights"] = {n: p.detach().clone() for n, p in lora.items()}
        seen["grads"].append({n: p.grad.detach().clone() for n, p in lora.items()})
        logs = finish(self, extra)
        seen["logs"].append(logs)
        return logs

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(policy_gradient, "ddpo_rollout", record_rollout)
        mp.setattr(policy_gradient.DDPORecipe, "collect", record_collect)
        mp.setattr(policy_gradient.DDPORecipe, "advantages", record_advantages)
        mp.setattr(policy_gradient, "iter_train_minibatches", record_minibatches)
        mp.setattr(OptimizerStep, "finish", record_finish)
        trainer = build_trainer(cfg, max_steps=2, accumulation=1)  # one epoch: 2 sample batches, 2 steps
        trainer.fit(model)

    assert len(seen["grads"]) == 2 and len(seen["batches"]) == 1
    # the window's gradient is taken at the weights the copy holds (those the rollout sampled with)
    own = dict(policy64.named_parameters())
    assert all(torch.equal(w.double(), own[n].detach()) for n, w in seen["weights"].items())
    first = seen["batches"][0]
    window = cfg.model.micro_batch_size
    index = torch.cat([b.indices for b in first])[:window]
    steps = torch.cat([b.steps for b in first])[:window]
    return {"cfg": cfg, "model": model, "policy64": policy64, "text64": text64, "window_index": index,
            "window_steps": steps, "rollouts": seen["rollouts"], "prompts": seen["prompts"],
            "advantages": seen["advantages"], "shell_grad": seen["grads"][0], "logs": seen["logs"],
            "sd_dir": tiny_sd_dir}


def ddim_schedule(sd_dir, num_steps):
    """(ᾱ over training timesteps [N], sampling timesteps [T], stride, ᾱ after the last step), from the
    scheduler config as DDIM defines them (scaled_linear betas, 'leading' spacing, steps_offset).

    The ᾱ table is the pipeline's: diffusers builds it in float32, and the last step's σ² ∝ 1 − ᾱ_1/ᾱ_0
    ≈ 1e-3 turns its float32 rounding into ~7e-5 of gradient, so the table is built in float32 too and
    everything after it in float64."""
    with open(os.path.join(sd_dir, "scheduler", "scheduler_config.json")) as f:
        c = json.load(f)
    assert c["beta_schedule"] == "scaled_linear" and c["timestep_spacing"] == "leading"
    assert c["prediction_type"] == "epsilon"
    n = c["num_train_timesteps"]
    betas = torch.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, n, dtype=torch.float32) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).double()
    ratio = n // num_steps
    timesteps = torch.arange(num_steps - 1, -1, -1) * ratio + c["steps_offset"]
    final = 1.0 if c["set_alpha_to_one"] else float(alphas_cumprod[0])
    return alphas_cumprod, timesteps, ratio, final


def encode(text64, tokenizer, prompts):
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text64(ids)[0]


def reference_log_probs(ep, sign=1.0, guidance=None):
    """log π of the window's stored steps ``[n, K]`` (with graph) and the reference loss."""
    cfg, model = ep["cfg"], ep["model"]
    rollout_latents = torch.cat([r.latents for r in ep["rollouts"]]).double()
    rollout_next = torch.cat([r.next_latents for r in ep["rollouts"]]).double()
    num_steps = rollout_latents.shape[1]
    ac, timesteps, ratio, final = ddim_schedule(ep["sd_dir"], num_steps)
    assert torch.equal(ep["rollouts"][0].timesteps.cpu(), timesteps)
    w = cfg.model.infer.unconditional_guidance_scale if guidance is None else guidance
    tok = model.backend.tokenizers[0]
    prompts = [ep["prompts"][int(b)] for b in ep["window_index"]]
    cond, uncond = encode(ep["text64"], tok, prompts), encode(ep["text64"], tok, [""])
    unet = ep["policy64"]
    rows = []
    for j, b in enumerate(ep["window_index"].tolist()):
        row = []
        for i in ep["window_steps"][j].tolist():
            t = int(timesteps[i])
            a = ac[t]
            a_prev = ac[t - ratio] if t - ratio >= 0 else torch.tensor(final, dtype=torch.float64)
            x, x_next = rollout_latents[b:b + 1, i], rollout_next[b:b + 1, i]
            out = unet(sample=torch.cat([x, x]), timestep=torch.tensor(t),
                       encoder_hidden_states=torch.cat([uncond, cond[j:j + 1]])).sample
            eps_u, eps_c = out.chunk(2)
            eps = eps_u + w * (eps_c - eps_u)
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            var = ETA ** 2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)  # σ_t² (eq. 16 with eta)
            mean = a_prev.sqrt() * x0 + (1 - a_prev - var).sqrt() * eps
            logp = -(x_next - mean) ** 2 / (2 * var) - 0.5 * torch.log(var) - 0.5 * math.log(2 * math.pi)
            row.append(logp.mean())
        rows.append(torch.stack(row))
    logp = torch.stack(rows)  # [n, K]
    adv = ep["advantages"].double()[ep["window_index"]].clamp(-ADV_CLIP, ADV_CLIP)[:, None]
    loss = -(sign * adv * torch.exp(logp - logp.detach())).mean()
    return logp, loss


def reference_grad(ep, **kwargs):
    unet = ep["policy64"]
    unet.zero_grad(set_to_none=True)
    logp, loss = reference_log_probs(ep, **kwargs)
    loss.backward()
    return logp.detach(), {n: p.grad.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}


def relative_errors(shell, ref):
    return {n: float((shell[n].double() - ref[n]).norm() / ref[n].norm()) for n in ref}


def test_first_window_is_on_policy_and_exercises_clipping(shell_epoch):
    ep = shell_epoch
    first = ep["logs"][0]
    assert first["clipfrac"] == 0.0 and abs(first["ratio_mean"] - 1.0) < 1e-5 and first["approx_kl"] < 1e-10
    adv = ep["advantages"][ep["window_index"]]
    assert (adv.abs() > ADV_CLIP).any(), "no advantage of the window reaches adv_clip_max: pick a smaller one"
    assert ep["window_steps"].shape == (4, 2)  # timestep_fraction 0.5 of 4 steps


def test_shell_gradient_equals_independent_reinforce(shell_epoch):
    ep = shell_epoch
    logp, ref = reference_grad(ep)
    # the written-out density is the policy the shell sampled from: it reproduces the stored log-probs
    stored = torch.cat([r.log_probs for r in ep["rollouts"]]).double()
    torch.testing.assert_close(logp, stored[ep["window_index"][:, None], ep["window_steps"]], atol=1e-5, rtol=0)
    shell = ep["shell_grad"]
    assert set(shell) == set(ref) and len(ref) > 0
    for n, g in ref.items():
        assert g.norm() > 0, f"reference gradient of {n} is zero: the comparison would be vacuous"
    errors = relative_errors(shell, ref)
    worst = max(errors, key=errors.get)
    print(f"\nDDPO shell vs REINFORCE: {len(errors)} LoRA tensors, max relative error {errors[worst]:.3e} ({worst})")
    assert errors[worst] <= TOLERANCE, (worst, errors[worst])


def test_the_comparison_can_fail(shell_epoch):
    """Flipped advantages, or no classifier-free guidance, give gradients the shell's is far from."""
    ep = shell_epoch
    for kwargs in ({"sign": -1.0}, {"guidance": 1.0}):
        _, wrong = reference_grad(ep, **kwargs)
        errors = relative_errors(ep["shell_grad"], wrong)
        print(f"\n{kwargs}: min relative error over LoRA tensors {min(errors.values()):.3e}")
        assert min(errors.values()) > 100 * TOLERANCE, (kwargs, min(errors.values()))
