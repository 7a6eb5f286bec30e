"""GRPO for diffusion and flow samplers (Flow-GRPO, Liu et al. 2025, arXiv 2505.05470; DanceGRPO, Xue
et al. 2025, arXiv 2505.07818), on any stochastic step rule: the flow SDE of SD3/FLUX
(:class:`~.schedulers.FlowMatchRule` with eta = the noise level a) or DDIM with eta > 0 for SD/SDXL.

The denoising chain is the same MDP as DDPO's (:mod:`.ddpo`): the policy is the Gaussian step
π_θ(x_{i+1} | x_i, c) = N(μ_θ(x_i, i, c), s_i² I). What GRPO changes:

1. **Groups.** Every prompt is sampled G times (``group_size``) from different initial noise in the
   same epoch; the advantage of sample k of a group is its reward standardised within the group,
   A_k = (r_k − mean_g r) / (std r + 1e-4) (population std) with the std of the whole epoch's rewards
   (``global_std``, Flow-GRPO's default) or of the group's own. No value network, no buffer across epochs.
2. **Clipped ratio**: the PPO-clip surrogate of :func:`.ddpo.ppo_clip_loss`, ρ = exp(log π_θ − log π_old).
3. **KL to the reference** (the model with adapters off, or its frozen copy), per step, in closed form
   for two Gaussians of the same std on the stored x_i:

       KL(π_θ ‖ π_ref) = ‖μ_θ − μ_ref‖² / (2 s_i²), averaged over latent dimensions

   (the same averaging as the log-probabilities), added to the loss with weight ``kl_coeff`` (β).
4. **Fewer steps in training than in evaluation** (Flow-GRPO's "denoising reduction"): rollouts use
   ``rollout_steps`` sampler steps (None: the sampler's own count), validation the configured count.

Log-probabilities are averaged over latent dimensions as in :mod:`.ddpo`, so ``clip_range`` is small
(1e-4 by default, as in DDPO and Flow-GRPO).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch

from ..typed import Section, setting
from .ddpo import Rollout, gather_steps, ppo_clip_loss
from .sampler import Denoiser
from .schedulers import StepRule, gaussian_log_prob

STD_EPS = 1e-4


@dataclass
class GRPOConfig(Section):
    """GRPO's epoch structure and objective settings (its config section)."""

    group_size: int = setting(4, ge=2, doc="samples per prompt in an epoch (G); divides micro_batch_size")
    num_sample_batches: int = setting(2, ge=1, doc="sample micro-batches (of micro_batch_size images) per epoch")
    num_inner_epochs: int = setting(1, ge=1)
    train_micro_batch_size: int = setting(1, ge=1)
    timestep_fraction: float = setting(1.0, gt=0, le=1, expected="a number in (0, 1]")
    clip_range: float = setting(1e-4, ge=0)
    adv_clip_max: float = setting(5.0, gt=0)
    kl_coeff: float = setting(0.04, ge=0, doc="β: weight of the per-step KL to the reference (adapters off)")
    global_std: bool = setting(True, doc="standardise by the epoch's reward std (true) or each group's (false)")
    rollout_steps: Optional[int] = setting(None, ge=1,
                                           doc="sampler steps of the training rollouts (None: model.infer.inference_steps)")
    eval_steps: List[int] = setting(default_factory=list,
                                    doc="validation also logs the reward at these sampling step counts (none by default)")

    # the policy-gradient recipe's shared switches: GRPO's statistics are its groups'
    per_prompt_stat_tracking = False

    def prompts_per_epoch(self, micro_batch_size: int):
        """(prompts one rank draws per epoch, how that number is made): each sample batch holds
        micro_batch_size / group_size prompts, each repeated group_size times."""
        return (micro_batch_size // self.group_size * self.num_sample_batches,
                "micro_batch_size / group_size × num_sample_batches")

    def rules(self):
        if any(n < 1 for n in self.eval_steps):
            yield "eval_steps", f"got {self.eval_steps}, expected integers >= 1"


def group_advantages(rewards: torch.Tensor, group_size: int, global_std: bool = False) -> torch.Tensor:
    """``[N]`` rewards laid out as N / G consecutive groups of G → ``[N]`` group-relative advantages."""
    r = rewards.detach().double()
    if r.ndim != 1 or r.shape[0] % group_size:
        raise ValueError(f"rewards must be [N] with N a multiple of group_size={group_size}, got {tuple(r.shape)}")
    groups = r.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    std = r.std(unbiased=False) if global_std else groups.std(dim=1, unbiased=False, keepdim=True)
    return (centred / (std + STD_EPS)).reshape(-1).to(rewards.dtype)


def step_gaussians(denoiser: Denoiser, rule: StepRule, x_t: torch.Tensor, steps: Union[int, torch.Tensor],
                   eta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[B, C, h, w]`` and std ``[B, 1, 1, 1]`` of the policy step from each x_t (with gradient
    through the denoiser). ``steps``: one index or ``[B]`` per-sample indices; the denoiser is called
    once with a ``[B]`` timestep tensor and the rule's algebra is applied per group of equal indices."""
    b = x_t.shape[0]
    steps_t = torch.full((b,), int(steps)) if not torch.is_tensor(steps) or steps.ndim == 0 else steps.long().cpu()
    if steps_t.shape != (b,):
        raise ValueError(f"steps must be an int or a [B] tensor with B={b}, got {tuple(steps_t.shape)}")
    uniq = torch.unique(steps_t).tolist()
    rows = {i: (steps_t == i).nonzero().flatten().to(x_t.device) for i in uniq}
    x_in = torch.empty_like(x_t)
    for i, r in rows.items():
        x_in[r] = rule.scale_model_input(x_t[r], i)
    t = rule.timesteps[int(uniq[0])] if len(uniq) == 1 else rule.timesteps[steps_t].to(x_t.device)
    out = denoiser(x_in, t)
    mean = torch.zeros_like(x_t)
    std = x_t.new_zeros(b, *([1] * (x_t.ndim - 1)))
    for i, r in rows.items():
        eps, x0 = rule.split_output(out[r], x_t[r], i)
        m, s = rule.step_distribution(x_t[r], eps, x0, i, eta)
        mean = mean.index_put((r,), m)
        std = std.index_put((r,), torch.as_tensor(s, dtype=x_t.dtype, device=x_t.device).expand(len(r), *std.shape[1:]))
    if bool((std <= 0).any()):
        raise ValueError("GRPO needs a stochastic step at every trained step: set eta > 0")
    return mean, std


def gaussian_kl_same_std(mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_p, std²) ‖ N(mean_q, std²)) averaged over non-batch dims, ``[B]``."""
    kl = (mean_p - mean_q) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))


def grpo_step_loss(denoiser: Denoiser, reference: Optional[Denoiser], rule: StepRule, rollout: Rollout,
                   advantages: torch.Tensor, steps: torch.Tensor, cfg: GRPOConfig,
                   eta: float) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Clipped-ratio loss plus β·KL of one train batch at one position of its step order.

    ``rollout``: the train batch's stored samples; ``advantages`` ``[b]`` (group-relative); ``steps``
    ``[b]``; ``reference`` the reference denoiser (no gradient; None only when ``kl_coeff`` is 0).
    """
    x_t = gather_steps(rollout.latents, steps)
    x_next = gather_steps(rollout.next_latents, steps)
    old = gather_steps(rollout.log_probs, steps)
    mean, std = step_gaussians(denoiser, rule, x_t, steps, eta)
    new = gaussian_log_prob(x_next, mean, std)
    loss, metrics = ppo_clip_loss(new, old, advantages, cfg.clip_range, cfg.adv_clip_max)
    if cfg.kl_coeff > 0:
        if reference is None:
            raise ValueError("kl_coeff > 0 needs the reference denoiser")
        with torch.no_grad():
            mean_ref, _ = step_gaussians(reference, rule, x_t, steps, eta)
        kl = gaussian_kl_same_std(mean, mean_ref, std).mean()
        loss = loss + cfg.kl_coeff * kl
        metrics["kl"] = kl.detach()
        metrics["loss"] = loss.detach()
    return loss, metrics
