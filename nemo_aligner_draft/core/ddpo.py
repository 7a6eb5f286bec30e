"""DDPO with the PPO-clip objective (Black et al. 2023, arXiv 2305.13301, §4.3 "DDPO_IS").

The denoising chain is an MDP whose policy is the Gaussian sampler step
``π_θ(x_{i+1} | x_i, c) = N(x_{i+1}; μ_θ(x_i, i, c), σ_i² I)`` (DDIM with eta > 0, Song et al. 2021
eq. 12). One epoch:

1. :func:`ddpo_rollout`: sample without gradient, storing x_0..x_T, the per-step log-probabilities
   log π_old of the steps taken and the timesteps.
2. Score the final images (any reward, differentiable or not) and turn rewards into advantages
   (:mod:`.stat_tracking`), clipped to ±``adv_clip_max``.
3. For each inner epoch, :func:`iter_train_minibatches` shuffles the samples into train batches
   and draws, per sample, a random order of ``timestep_fraction·T`` steps. For each position j of
   that order :func:`ddpo_step_loss` recomputes log π_θ of the stored step with gradient and
   returns the PPO-clip loss (eq. 4 with the PPO surrogate):

       ρ = exp(log π_θ − log π_old),
       L = mean_b max(−A_b ρ_b, −A_b clip(ρ_b, 1 − ε, 1 + ε)).

   The reference implementation accumulates the gradients of all j positions of one train batch
   before an optimizer step; that loop (inner epochs, accumulation, optimizer) belongs to the
   training shell.

Log-probabilities are averaged over latent dimensions (as in the reference implementation), so ρ
is a per-dimension geometric mean ratio and ``clip_range`` (default 1e-4) is correspondingly small.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch

from ..typed import Section, setting
from .sampler import Denoiser, StepPlan, sample
from .schedulers import StepRule


@dataclass
class DDPOConfig(Section):
    """DDPO's epoch structure and PPO settings (its config section; defaults from the DDPO
    paper's released configs). The sampler's eta is not here: it is the sampler's, passed separately."""

    num_sample_batches: int = setting(2, ge=1, doc="sample micro-batches per PPO epoch")
    num_inner_epochs: int = setting(1, ge=1)
    train_micro_batch_size: int = setting(1, ge=1)
    timestep_fraction: float = setting(1.0, gt=0, le=1, expected="a number in (0, 1]")
    clip_range: float = setting(1e-4, ge=0)
    adv_clip_max: float = setting(5.0, gt=0)
    per_prompt_stat_tracking: bool = setting(True)
    stat_buffer_size: int = setting(32, ge=1)
    stat_min_count: int = setting(16, ge=1)
    eval_steps: List[int] = setting(default_factory=list,
                                    doc="validation also logs the reward at these sampling step counts (none by default)")

    def prompts_per_epoch(self, micro_batch_size: int):
        """(prompts one rank draws per epoch, how that number is made) for the data layer and its checks."""
        return micro_batch_size * self.num_sample_batches, "micro_batch_size × num_sample_batches"

    def rules(self):
        if self.stat_min_count > self.stat_buffer_size:
            yield "stat_min_count", (f"got {self.stat_min_count}, expected <= stat_buffer_size="
                                     f"{self.stat_buffer_size} (the per-prompt statistics would never be used)")
        if any(n < 1 for n in self.eval_steps):
            yield "eval_steps", f"got {self.eval_steps}, expected integers >= 1"


@dataclass
class Rollout:
    """Stored samples of one rollout, all detached.

    latents ``[B, T, C, h, w]``: x_i before step i; next_latents ``[B, T, C, h, w]``: x_{i+1};
    log_probs ``[B, T]``: log π_old(x_{i+1} | x_i) (mean over latent dims); timesteps ``[T]``. T counts the
    stochastic steps (:attr:`num_steps`): the sampler's, less a deterministic last DDIM step if it has one
    (model timesteps, descending); final ``[B, C, h, w]``: the sample; pred_x0_steps: per-step x̂0
    ``[B, T, C, h, w]`` when requested (SDPO), else None.
    """

    latents: torch.Tensor
    next_latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    final: torch.Tensor
    pred_x0_steps: Optional[torch.Tensor] = None

    @property
    def num_steps(self) -> int:
        return int(self.log_probs.shape[1])

    def select(self, index: torch.Tensor) -> "Rollout":
        """The rollout restricted to the samples in ``index`` ``[b]``."""
        px = None if self.pred_x0_steps is None else self.pred_x0_steps[index]
        return Rollout(self.latents[index], self.next_latents[index], self.log_probs[index],
                       self.timesteps, self.final[index], px)


def ddpo_rollout(denoiser: Denoiser, rule: StepRule, latents: torch.Tensor, eta: float,
                 generator: Optional[torch.Generator] = None, keep_pred_x0: bool = False) -> Rollout:
    """Sample under no_grad with a stochastic DDIM step (``eta > 0``), storing what PPO needs."""
    if not getattr(rule, "stochastic", False) or eta <= 0:
        raise ValueError("policy-gradient rollouts need a stochastic sampler (DDIM or flow) with eta > 0 "
                         f"(got {type(rule).__name__}, eta={eta})")
    with torch.no_grad():
        out = sample(denoiser, rule, latents, StepPlan.no_grad(rule.num_steps), eta=eta,
                     generator=generator, keep_trajectory=True, keep_pred_x0=keep_pred_x0)
    traj = out.trajectory
    px = torch.stack([p.detach() for p in out.pred_x0_steps], dim=1) if keep_pred_x0 else None
    if out.log_probs is None:
        raise ValueError(f"no step of the {rule.num_steps}-step sampler is stochastic at eta={eta}")
    # A DDIM schedule whose last step lands on ᾱ = 1 (the scheduler's set_alpha_to_one) makes that step
    # deterministic at any eta: it has no log-probability and no policy gradient, so the rollout holds the
    # stochastic steps only (a prefix: the sampler refuses any other layout). pred_x0_steps keep every step.
    n = out.log_probs.shape[1]
    return Rollout(traj[:, :n], traj[:, 1:n + 1], out.log_probs, rule.timesteps[:n].clone(),
                   out.latents.detach(), px)


def ddpo_log_prob(denoiser: Denoiser, rule: StepRule, x_t: torch.Tensor, x_next: torch.Tensor,
                  steps: Union[int, torch.Tensor], eta: float) -> torch.Tensor:
    """log π_θ(x_next | x_t) with gradient, ``[B]`` (mean over latent dims).

    x_t, x_next ``[B, C, h, w]``. ``steps``: one step index for the whole batch, or ``[B]`` indices,
    one per sample. With per-sample indices the denoiser is called once with a ``[B]`` timestep
    tensor, so it must accept per-sample timesteps (a plain diffusers UNet does); the step-rule
    algebra is then applied per group of equal indices.
    """
    if isinstance(steps, int) or (torch.is_tensor(steps) and steps.ndim == 0):
        i = int(steps)
        out = denoiser(rule.scale_model_input(x_t, i), rule.timesteps[i])
        eps, x0 = rule.split_output(out, x_t, i)
        return rule.step_log_prob(x_t, eps, x0, i, x_next, eta)
    steps = steps.long().cpu()
    if steps.shape != (x_t.shape[0],):
        raise ValueError(f"steps must be an int or a [B] tensor with B={x_t.shape[0]}, got {tuple(steps.shape)}")
    uniq = torch.unique(steps).tolist()
    if len(uniq) == 1:
        return ddpo_log_prob(denoiser, rule, x_t, x_next, int(uniq[0]), eta)
    x_in = torch.empty_like(x_t)
    rows = {i: (steps == i).nonzero().flatten().to(x_t.device) for i in uniq}
    for i, r in rows.items():
        x_in[r] = rule.scale_model_input(x_t[r], i)
    out = denoiser(x_in, rule.timesteps[steps].to(x_t.device))
    log_prob = x_t.new_empty(x_t.shape[0])
    parts = []
    for i, r in rows.items():
        eps, x0 = rule.split_output(out[r], x_t[r], i)
        parts.append((r, rule.step_log_prob(x_t[r], eps, x0, i, x_next[r], eta)))
    # index_put keeps the graph of every group's log-prob
    for r, lp in parts:
        log_prob = log_prob.index_put((r,), lp)
    return log_prob


def ppo_clip_loss(log_prob_new: torch.Tensor, log_prob_old: torch.Tensor, advantages: torch.Tensor,
                  clip_range: float, adv_clip_max: float) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """PPO-clip surrogate, all inputs ``[B]``. Returns (loss, metrics).

    L = mean max(−A ρ, −A clip(ρ, 1−ε, 1+ε)), A clipped to ±adv_clip_max, ρ = exp(new − old).
    Metrics: approx_kl = ½ mean (new − old)² (the reference implementation's estimator), clipfrac =
    fraction with |ρ − 1| > ε, adv_clipfrac = fraction of advantages that were clipped.
    """
    adv = advantages.detach().clamp(-adv_clip_max, adv_clip_max)
    log_ratio = log_prob_new - log_prob_old.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),
            "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).float().mean(),
            "adv_clipfrac": (advantages.detach().abs() > adv_clip_max).float().mean(),
            "ratio_mean": ratio.detach().mean(),
        }
    return loss, metrics


def select_timesteps(num_steps: int, timestep_fraction: float, batch_size: int,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per sample, a random order of ``max(1, int(T·timestep_fraction))`` distinct step indices.

    Returns ``[batch_size, K]`` long (CPU). DDPO trains each sample on its own random subset.
    """
    k = max(1, int(num_steps * timestep_fraction))
    keys = torch.rand(batch_size, num_steps, generator=generator)
    return keys.argsort(dim=1)[:, :k]


@dataclass
class TrainMinibatch:
    """indices ``[b]`` into the stored samples; steps ``[b, K]`` the step order of each sample."""

    indices: torch.Tensor
    steps: torch.Tensor


def iter_train_minibatches(num_samples: int, train_batch_size: int, num_steps: int,
                           timestep_fraction: float, generator: Optional[torch.Generator] = None,
                           shared_timesteps: bool = False) -> Iterator[TrainMinibatch]:
    """One inner epoch: shuffle the samples into train batches and draw each sample's step order.

    ``shared_timesteps``: one order per train batch (all samples at the same step in each call),
    for denoisers that accept only a scalar timestep.
    """
    if train_batch_size < 1 or num_samples % train_batch_size:
        raise ValueError(f"the number of samples per epoch ({num_samples}) must be a multiple of "
                         f"train_batch_size ({train_batch_size})")
    perm = torch.randperm(num_samples, generator=generator)
    for start in range(0, num_samples, train_batch_size):
        idx = perm[start:start + train_batch_size]
        if shared_timesteps:
            steps = select_timesteps(num_steps, timestep_fraction, 1, generator).expand(len(idx), -1)
        else:
            steps = select_timesteps(num_steps, timestep_fraction, len(idx), generator)
        yield TrainMinibatch(idx, steps)


def gather_steps(per_step: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """``per_step[b, steps[b]]`` for a ``[B, T, ...]`` tensor and ``[B]`` indices → ``[B, ...]``."""
    rows = torch.arange(per_step.shape[0], device=per_step.device)
    return per_step[rows, steps.to(per_step.device)]


def ddpo_step_loss(denoiser: Denoiser, rule: StepRule, rollout: Rollout, advantages: torch.Tensor,
                   steps: torch.Tensor, cfg: DDPOConfig, eta: float) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """PPO-clip loss of one train batch at one position of its step order.

    ``rollout``: the train batch's stored samples (``Rollout.select``); ``advantages`` ``[b]``;
    ``steps`` ``[b]`` step indices (column j of :attr:`TrainMinibatch.steps`); ``denoiser`` built for
    the train batch's prompts with the sampling guidance scale; ``eta`` the rollout sampler's (> 0).
    """
    x_t = gather_steps(rollout.latents, steps)
    x_next = gather_steps(rollout.next_latents, steps)
    old = gather_steps(rollout.log_probs, steps)
    new = ddpo_log_prob(denoiser, rule, x_t, x_next, steps, eta)
    return ppo_clip_loss(new, old, advantages, cfg.clip_range, cfg.adv_clip_max)
