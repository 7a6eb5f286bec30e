"""SDPO: Stepwise Diffusion Policy Optimization (Zhang et al. 2024, arXiv 2411.11727), for
few-step samplers.

What is implemented (our reading of §3–4 of the paper and its released configuration; names of the
quantities follow the paper, equation numbers are not quoted because they differ between versions):

1. **Paired rollouts** (:func:`sdpo_paired_rollout`): two trajectories per prompt, both started from
   the *same* initial noise x_T and differing only in the eta-noise of the stochastic DDIM steps.
   Every step's one-step prediction x̂0(x_i) is kept ("dual-state" trajectory: noisy and predicted
   clean state at each step).
2. **Dense rewards** (:func:`dense_rewards`): r_i = r(decode(x̂0_i), c) for every step i, shape
   ``[B, T]``. The paper's cheaper variant, which queries the reward at a few anchor steps only and
   interpolates the rest by latent similarity, is not implemented: every step is scored.
3. **Stepwise returns** (:func:`discounted_returns`): G_i = r_i + γ G_{i+1}, G_{T−1} = r_{T−1}
   (γ = 0.99 by default; γ = 0 keeps the raw dense rewards).
4. **Stepwise advantages**: G normalised per (prompt, step) with the stat tracker
   (:class:`~.stat_tracking.PerPromptStatTracker` given ``[2B, T]`` returns of both trajectories),
   then clipped to ±``adv_clip_max``.
5. **Dense reward-difference objective** (:func:`sdpo_loss`), per step i of a pair (1, 2):

       Δ_i   = [log π_θ(x¹_{i+1}|x¹_i) − log π_old(x¹_{i+1}|x¹_i)]
             − [log π_θ(x²_{i+1}|x²_i) − log π_old(x²_{i+1}|x²_i)]
       w_i   = λ^i / log_scale                  (temporal importance weight, λ = 0.99; i = 0 is
                                                  the noisiest step, so early steps weigh most)
       L_i   = (w_i Δ_i − (A¹_i − A²_i))²
       L^c_i = (w_i Δ^c_i − (A¹_i − A²_i))²,  Δ^c with each log π_θ clamped to log π_old ± ε
       L     = mean max(L_i, L^c_i)             (PPO-style pessimistic clipping; ε = clip_range)

   i.e. the scaled log-ratio difference of the two trajectories is regressed onto their
   advantage difference. At π_θ = π_old, L = mean (A¹ − A²)².
6. **Step-shuffled updates**: each pair trains on its steps in a random order
   (:func:`~.ddpo.iter_train_minibatches` gives the orders); one :func:`sdpo_step_loss` per position.

Log-probabilities are averaged over latent dimensions, as in :mod:`.ddpo`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..typed import Section, setting
from .ddpo import Rollout, ddpo_log_prob, ddpo_rollout, gather_steps
from .sampler import Denoiser
from .schedulers import StepRule
from .stat_tracking import PerPromptStatTracker, batch_advantages

Decoder = Callable[[torch.Tensor], torch.Tensor]
Scorer = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SDPOConfig(Section):
    """SDPO's epoch structure and objective settings (its config section; defaults from the
    paper's released base configuration). The sampler's eta is passed separately."""

    num_sample_batches: int = setting(2, ge=1, doc="sample micro-batches (of pairs) per epoch")
    num_inner_epochs: int = setting(1, ge=1)
    train_micro_batch_size: int = setting(1, ge=1, doc="pairs per train micro-batch")
    timestep_fraction: float = setting(1.0, gt=0, le=1, expected="a number in (0, 1]")
    gamma: float = setting(0.99, ge=0, le=1, expected="a number in [0, 1]", doc="discount of the dense rewards")
    lam: float = setting(0.99, gt=0, doc="temporal importance weight lam^i")
    log_scale: float = setting(1.0, gt=0)
    clip_range: float = setting(1e-4, ge=0)
    adv_clip_max: float = setting(5.0, gt=0)
    stat_buffer_size: int = setting(32, ge=1)
    stat_min_count: int = setting(16, ge=1)
    per_prompt_stat_tracking: bool = setting(True)
    eval_steps: List[int] = setting(default_factory=lambda: [1, 2, 4, 8],
                                    doc="validation also logs the reward at these sampling step counts")

    def prompts_per_epoch(self, micro_batch_size: int):
        """(prompts one rank draws per epoch, how that number is made) for the data layer and its checks."""
        return micro_batch_size * self.num_sample_batches, "micro_batch_size × num_sample_batches"

    def rules(self):
        if self.stat_min_count > self.stat_buffer_size:
            yield "stat_min_count", (f"got {self.stat_min_count}, expected <= stat_buffer_size="
                                     f"{self.stat_buffer_size} (the per-prompt statistics would never be used)")
        if not self.eval_steps or any(n < 1 for n in self.eval_steps):
            yield "eval_steps", f"got {self.eval_steps}, expected a non-empty list of integers >= 1"


def sdpo_paired_rollout(denoiser: Denoiser, rule: StepRule, latents: torch.Tensor, eta: float,
                        generator: Optional[torch.Generator] = None) -> Tuple[Rollout, Rollout]:
    """Two no-grad rollouts from the same x_T ``[B, C, h, w]``, each with per-step x̂0 kept."""
    first = ddpo_rollout(denoiser, rule, latents, eta, generator, keep_pred_x0=True)
    second = ddpo_rollout(denoiser, rule, latents, eta, generator, keep_pred_x0=True)
    return first, second


def dense_rewards(pred_x0_steps: torch.Tensor, decode: Decoder, score: Scorer) -> torch.Tensor:
    """Reward of every step's one-step prediction: ``[B, T, C, h, w]`` → ``[B, T]`` (no grad)."""
    b, t = pred_x0_steps.shape[:2]
    with torch.no_grad():
        flat = pred_x0_steps.reshape(b * t, *pred_x0_steps.shape[2:])
        rewards = torch.as_tensor(score(decode(flat))).reshape(b, t)
    return rewards.float()


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_i = r_i + γ G_{i+1} along the step axis of ``[B, T]`` rewards (G_{T−1} = r_{T−1})."""
    out = rewards.clone()
    for i in range(rewards.shape[1] - 2, -1, -1):
        out[:, i] = rewards[:, i] + gamma * out[:, i + 1]
    return out


def sdpo_advantages(returns1: torch.Tensor, returns2: torch.Tensor, prompts: Sequence[str],
                    tracker: Optional[PerPromptStatTracker]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-step-prompt normalised advantages of both trajectories, each ``[B, T]``.

    Both trajectories' returns enter the same per-(prompt, step) statistics. Without a tracker the
    statistics of all returns of the batch are used.
    """
    both = torch.cat([returns1, returns2])
    if tracker is None:
        adv = batch_advantages(both)
    else:
        adv = tracker.update(list(prompts) * 2, both)
    return adv[: returns1.shape[0]], adv[returns1.shape[0]:]


def temporal_weights(num_steps: int, lam: float, log_scale: float) -> torch.Tensor:
    """w_i = λ^i / log_scale for steps i = 0 … T−1, ``[T]``."""
    return lam ** torch.arange(num_steps, dtype=torch.float64) / log_scale


def sdpo_loss(logp1_new: torch.Tensor, logp1_old: torch.Tensor, logp2_new: torch.Tensor,
              logp2_old: torch.Tensor, adv1: torch.Tensor, adv2: torch.Tensor, weights: torch.Tensor,
              clip_range: float, adv_clip_max: float) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The clipped dense reward-difference loss of the module docstring; all inputs ``[B]``."""
    a1 = adv1.detach().clamp(-adv_clip_max, adv_clip_max)
    a2 = adv2.detach().clamp(-adv_clip_max, adv_clip_max)
    target = a1 - a2
    w = weights.to(logp1_new)
    o1, o2 = logp1_old.detach(), logp2_old.detach()
    delta = (logp1_new - o1) - (logp2_new - o2)
    loss_u = (w * delta - target) ** 2
    if clip_range > 0:
        c1 = torch.clamp(logp1_new, o1 - clip_range, o1 + clip_range)
        c2 = torch.clamp(logp2_new, o2 - clip_range, o2 + clip_range)
        loss_c = (w * ((c1 - o1) - (c2 - o2)) - target) ** 2
        loss = torch.maximum(loss_u, loss_c).mean()
        clipfrac = (loss_c > loss_u).float().mean()
    else:
        loss = loss_u.mean()
        clipfrac = torch.zeros(())
    metrics = {
        "loss": loss.detach(),
        "clipfrac": clipfrac.detach(),
        "log_ratio_diff": delta.detach().abs().mean(),
        "adv_clipfrac": 0.5 * ((adv1.abs() > adv_clip_max).float().mean()
                               + (adv2.abs() > adv_clip_max).float().mean()).detach(),
    }
    return loss, metrics


def sdpo_step_loss(denoiser: Denoiser, rule: StepRule, first: Rollout, second: Rollout,
                   adv1: torch.Tensor, adv2: torch.Tensor, steps: torch.Tensor,
                   cfg: SDPOConfig, eta: float) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Loss of one train batch of pairs at one position of their step order.

    ``first``/``second``: the pairs' stored rollouts (``Rollout.select``); ``adv1``/``adv2``
    ``[b, T]``; ``steps`` ``[b]`` step indices; ``denoiser`` built for the batch's prompts.
    """
    steps = steps.long()
    lp_new, lp_old = [], []
    for ro in (first, second):
        x_t, x_next = gather_steps(ro.latents, steps), gather_steps(ro.next_latents, steps)
        lp_new.append(ddpo_log_prob(denoiser, rule, x_t, x_next, steps, eta))
        lp_old.append(gather_steps(ro.log_probs, steps))
    w = temporal_weights(rule.num_steps, cfg.lam, cfg.log_scale)[steps.cpu()]
    return sdpo_loss(lp_new[0], lp_old[0], lp_new[1], lp_old[1], gather_steps(adv1, steps),
                     gather_steps(adv2, steps), w, cfg.clip_range, cfg.adv_clip_max)
