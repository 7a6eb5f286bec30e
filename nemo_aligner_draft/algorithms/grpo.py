"""The GRPO recipe (``model.algorithm: grpo``) on the policy-gradient loop of :mod:`.policy_gradient`.

One training_step is one epoch: ``num_sample_batches`` sample batches of ``micro_batch_size`` images,
each batch ``micro_batch_size / group_size`` prompts repeated ``group_size`` times (a group: the same
prompt from different initial noise, all in the same batch). Rollouts are stochastic (the flow SDE for
SD3/FLUX, DDIM with eta > 0 for SD/SDXL), on ``model.grpo.rollout_steps`` sampler steps when set. The
final images are scored, advantages are standardised within each group
(:func:`..core.grpo.group_advantages`) and the train passes minimise the clipped-ratio loss plus β·KL to
the reference (:func:`..core.grpo.grpo_step_loss`). The reference is the network with its adapters off
(LoRA) or the frozen copy (full fine-tuning), built per train batch from the same conditioning.
"""
from __future__ import annotations

from typing import List

import torch

from ..core.ddpo import ddpo_rollout
from ..core.grpo import grpo_step_loss, group_advantages
from ..errors import InputError
from .policy_gradient import PolicyGradientRecipe, cat_rollouts


class GRPORecipe(PolicyGradientRecipe):
    """Group-relative policy optimisation with a KL to the reference."""

    def __init__(self, model):
        super().__init__(model)
        g, mbs = self.pg.group_size, model.mcfg.micro_batch_size
        if mbs % g:
            raise InputError("model.grpo.group_size", f"got {g}, expected a divisor of model.micro_batch_size={mbs} "
                                                     f"(a sample batch holds whole groups)")

    def chunk_prompts(self, prompts: List[str]) -> List[List[str]]:
        per, g = self.model.mcfg.micro_batch_size // self.pg.group_size, self.pg.group_size
        return [[p for p in prompts[i:i + per] for _ in range(g)] for i in range(0, len(prompts), per)]

    def collect(self, chunks, epoch_round):
        model, pg = self.model, self.pg
        eta = model.mcfg.infer.eta
        w = model.mcfg.infer.unconditional_guidance_scale
        rollouts, rewards = [], []
        for j, chunk in enumerate(chunks):
            rule, cond, latents, g = model.sampling_setup(chunk, self.rollout_round(epoch_round, j), "rollout",
                                                          num_steps=pg.rollout_steps)
            ro = ddpo_rollout(model.backend.denoiser(cond, w), rule, latents, eta, generator=g)
            with torch.no_grad():
                r, _ = model.score(model.decode(ro.final), chunk)
            rollouts.append(ro)
            rewards.append(r.detach())
        rollout = cat_rollouts(rollouts)
        rewards_t = torch.cat(rewards)
        prompts = [p for c in chunks for p in c]
        adv = group_advantages(rewards_t, pg.group_size, pg.global_std).to(rollout.log_probs.device)
        self.samples_seen += len(prompts) * model.dp_size
        use_ref = pg.kl_coeff > 0

        def step_loss(idx, steps, rule, den, cond):
            ref = model.backend.reference_denoiser(cond, w) if use_ref else None
            return grpo_step_loss(den, ref, rule, rollout.select(idx.to(rollout.final.device)), adv[idx], steps,
                                  pg, eta)

        return prompts, rule, step_loss, self.reward_stats(rewards_t), rollout.num_steps
