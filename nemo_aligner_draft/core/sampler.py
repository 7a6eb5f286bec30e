"""Sampling with gradients: one loop for DRaFT(+)/-K/-LV, AlignProp, DDPO rollouts and SDXL.

Which steps carry gradient is described by a :class:`StepPlan` (one flag pair per step), so every
truncation scheme is data, not a code path:

* DRaFT-K: ``StepPlan.last_k(T, K)`` — steps ``< T−K`` run under ``no_grad``.
* AlignProp (one cut per rollout): ``StepPlan.from_cut(T, cut)``.
* AlignProp (original, per-step redraw): ``StepPlan.per_step_detach(mask)`` — every step runs with
  autograd on, but the UNet *output* is detached where ``mask[i]``; the gradient still flows through
  the latent chain x_i → x_{i+1}.

With ``checkpoint=True`` each step with gradient (the UNet call and the step rule) is recomputed in
the backward pass instead of stored, so full-chain backprop costs memory flat in T.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from .schedulers import StepRule

# (model_input [B,C,h,w], timestep scalar tensor) -> raw model output [B,C,h,w], CFG already applied
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepPlan:
    """Per-step gradient flags. ``grad[i]``: run step i with autograd on. ``detach_output[i]``:
    treat the UNet output of step i as a constant (only meaningful where ``grad[i]``)."""

    grad: List[bool]
    detach_output: List[bool]

    def __post_init__(self):
        if len(self.grad) != len(self.detach_output):
            raise ValueError("StepPlan.grad and StepPlan.detach_output differ in length")

    @property
    def num_steps(self) -> int:
        return len(self.grad)

    @property
    def grad_steps(self) -> List[int]:
        """Steps whose UNet output carries gradient to the parameters."""
        return [i for i, (g, d) in enumerate(zip(self.grad, self.detach_output)) if g and not d]

    @classmethod
    def last_k(cls, num_steps: int, k: int) -> "StepPlan":
        if not 0 <= k <= num_steps:
            raise ValueError(f"truncation_steps must be in [0, {num_steps}], got {k}")
        return cls([i >= num_steps - k for i in range(num_steps)], [False] * num_steps)

    @classmethod
    def from_cut(cls, num_steps: int, cut: int) -> "StepPlan":
        """Gradient on steps ``cut … T−1`` (AlignProp's one cut per rollout; ``cut = T−K`` is DRaFT-K)."""
        return cls.last_k(num_steps, num_steps - cut)

    @classmethod
    def per_step_detach(cls, detach_mask: List[bool]) -> "StepPlan":
        return cls([True] * len(detach_mask), list(detach_mask))

    @classmethod
    def no_grad(cls, num_steps: int) -> "StepPlan":
        return cls([False] * num_steps, [False] * num_steps)


@dataclass
class SampleOutput:
    """latents: final sample x_T→0 ``[B,C,h,w]``; pred_x0: the last step's x̂0 prediction.
    eps / eps_ref: ε̂ of policy and reference at each step in ``grad_steps`` (CFG-combined).
    For DDPO, ``trajectory`` holds x_0..x_T (detached, ``[B, T+1, C, h, w]``) and ``log_probs``
    the per-step log-density of the taken step ``[B, T]``."""

    latents: torch.Tensor
    pred_x0: torch.Tensor
    eps: List[torch.Tensor] = field(default_factory=list)
    eps_ref: List[torch.Tensor] = field(default_factory=list)
    grad_steps: List[int] = field(default_factory=list)
    pred_x0_steps: List[torch.Tensor] = field(default_factory=list)
    trajectory: Optional[torch.Tensor] = None
    log_probs: Optional[torch.Tensor] = None


def model_step(denoiser: Denoiser, rule: StepRule, x: torch.Tensor, i: int, noise, eta: float,
               detach_output: bool = False):
    """One sampler step: UNet call at step ``i`` then the rule. Returns (x_next, ε̂, x̂0, log_prob)."""
    out = denoiser(rule.scale_model_input(x, i), rule.timesteps[i])
    if detach_output:
        out = out.detach()
    eps, x0 = rule.split_output(out, x, i)
    step = rule.step(x, eps, x0, i, noise=noise, eta=eta)
    return step.prev_sample, eps, x0, step.log_prob


def sample(
    denoiser: Denoiser,
    rule: StepRule,
    latents: torch.Tensor,
    plan: StepPlan,
    *,
    reference: Optional[Denoiser] = None,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    checkpoint: bool = False,
    keep_trajectory: bool = False,
    keep_pred_x0: bool = False,
) -> SampleOutput:
    """Run the full sampler from ``latents`` (already scaled by ``rule.init_noise_sigma()``).

    reference: if given, evaluated under ``no_grad`` on the policy's own x_i at every step in
    ``plan.grad_steps`` (DRaFT+ penalty). ``generator`` draws the eta-noise, outside any
    checkpointed region so recomputation in backward is exact.
    """
    if plan.num_steps != rule.num_steps:
        raise ValueError(f"plan has {plan.num_steps} steps but the sampler has {rule.num_steps}")
    x = latents
    out = SampleOutput(latents=x, pred_x0=x)
    traj = [x.detach()] if keep_trajectory else None
    log_probs = []
    for i in range(rule.num_steps):
        noise = None
        if eta > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if not plan.grad[i]:
            with torch.no_grad():
                x_next, eps, x0, lp = model_step(denoiser, rule, x, i, noise, eta)
        elif checkpoint:
            x_next, eps, x0, lp = _checkpoint(
                model_step, denoiser, rule, x, i, noise, eta, plan.detach_output[i],
                use_reentrant=False,
            )
        else:
            x_next, eps, x0, lp = model_step(denoiser, rule, x, i, noise, eta, plan.detach_output[i])
        if plan.grad[i] and not plan.detach_output[i]:
            out.grad_steps.append(i)
            out.eps.append(eps)
            if reference is not None:
                with torch.no_grad():
                    ref_out = reference(rule.scale_model_input(x.detach(), i), rule.timesteps[i])
                    out.eps_ref.append(rule.split_output(ref_out, x.detach(), i)[0])
        if keep_pred_x0:
            out.pred_x0_steps.append(x0)
        if lp is not None:
            log_probs.append(lp.detach())
        if traj is not None:
            traj.append(x_next.detach())
        out.pred_x0 = x0
        x = x_next
    out.latents = x
    if traj is not None:
        out.trajectory = torch.stack(traj, dim=1)
    if log_probs:
        out.log_probs = torch.stack(log_probs, dim=1)
    return out
