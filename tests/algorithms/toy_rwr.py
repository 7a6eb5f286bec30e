"""A toy algorithm added in one file: reward-weighted regression on the model's own samples.

Each micro-batch: sample without gradient, score the images, re-noise each final latent to a random
training timestep and regress the network's ε prediction onto the noise that was added, weighted by
``softmax(reward / temperature)`` over the batch (RWR: Peters & Schaal 2007; for diffusion, Lee et al.
2023 arXiv 2302.12192). Not a method this package ships: it exists to show — and to test — that an
algorithm is one file plus one registry line (``tests/algorithms/test_toy_algorithm.py``).
"""
from dataclasses import dataclass

import torch

from nemo_aligner_draft.algorithms.reward_backprop import RewardBackpropRecipe
from nemo_aligner_draft.core.sampler import StepPlan, sample
from nemo_aligner_draft.typed import Section, setting


@dataclass
class ToyRWRConfig(Section):
    """The algorithm's own section, ``model.toy_rwr``."""

    temperature: float = setting(0.1, gt=0, doc="softmax temperature of the reward weights")


class ToyRWRRecipe(RewardBackpropRecipe):
    def objective(self, prompts, round_idx):
        model = self.model
        cfg = model.mcfg.toy_rwr
        rule, cond, latents, g = model.sampling_setup(prompts, round_idx, "rollout")
        w = model.mcfg.infer.unconditional_guidance_scale
        with torch.no_grad():
            x0 = sample(model.backend.denoiser(cond, w), rule, latents, StepPlan.no_grad(rule.num_steps)).latents
            rewards, _ = model.score(model.decode(x0), prompts)
        weights = torch.softmax(rewards / cfg.temperature, dim=0).detach()
        scheduler = model.backend.scheduler
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(prompts),), generator=g)
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        noisy = scheduler.add_noise(x0, noise, t.to(x0.device))
        eps = model.backend.denoiser(cond, 1.0)(noisy, t.to(x0.device))  # the conditional prediction
        per_sample = ((eps - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (weights * per_sample).sum()
        return loss, {"loss": loss.detach(), "reward_mean": rewards.mean(), "reward_std": rewards.std(unbiased=False),
                      "rwr_weight_max": weights.max()}
