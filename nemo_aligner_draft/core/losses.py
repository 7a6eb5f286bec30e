"""Objectives written as formulas. Loss is minimised.

DRaFT+ (Clark et al. 2023 as extended by NeMo-Aligner):
    L = −mean_b r(x̂0_b, c_b) + kl_coeff · mean_k mean_{b,c,h,w} (ε̂_θ,k − ε̂_ref,k)²
where k runs over the steps that carry gradient and ε̂ are the CFG-combined predictions of
policy and reference on the policy's own x_k.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch


def eps_penalty(eps: Sequence[torch.Tensor], eps_ref: Sequence[torch.Tensor]) -> torch.Tensor:
    """mean_k mean_{b,c,h,w} (ε̂_θ,k − ε̂_ref,k)². Zero when there are no grad steps."""
    if len(eps) != len(eps_ref):
        raise ValueError(f"{len(eps)} policy predictions but {len(eps_ref)} reference predictions")
    if not eps:
        return torch.zeros(())
    return torch.stack([((e - r.to(e.dtype)) ** 2).mean() for e, r in zip(eps, eps_ref)]).mean()


def draftp_loss(rewards: torch.Tensor, eps: List[torch.Tensor], eps_ref: List[torch.Tensor],
                kl_coeff: float) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """rewards ``[B]``; eps/eps_ref lists of ``[B,C,h,w]``. Returns (loss, metrics)."""
    reward_term = -rewards.mean()
    penalty = eps_penalty(eps, eps_ref).to(rewards.device) if kl_coeff else torch.zeros((), device=rewards.device)
    loss = reward_term + kl_coeff * penalty
    return loss, objective_metrics(loss, rewards, penalty)


def objective_metrics(loss: torch.Tensor, rewards: torch.Tensor, penalty: torch.Tensor) -> Dict[str, torch.Tensor]:
    """What every reward-gradient objective logs: the loss, the batch's reward mean and (population) std,
    and the ε penalty."""
    return {"loss": loss.detach(), "reward_mean": rewards.detach().mean(),
            "reward_std": rewards.detach().std(unbiased=False), "kl_penalty": penalty.detach()}


def reward_to_loss(rewards: torch.Tensor, mode: str = "negate", target: float = 0.0,
                   coeff: float = 1.0) -> torch.Tensor:
    """AlignProp's reward-to-loss options. ``negate``: −coeff·mean r; ``target``: coeff·mean |r − target|."""
    if mode == "negate":
        return -coeff * rewards.mean()
    if mode == "target":
        return coeff * (rewards - target).abs().mean()
    raise ValueError(f"loss mode must be 'negate' or 'target', got {mode!r}")
