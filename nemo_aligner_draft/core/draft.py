"""DRaFT family objectives (Clark et al. 2023, arXiv 2309.17400) on the shared sampler.

* DRaFT: kl_coeff = 0, gradient through the last K steps (``truncation_steps``).
* DRaFT+: the same with the ε-gap penalty to a frozen reference (see :mod:`.losses`).
* DRaFT-LV (§4.2): sample all steps without gradient, then re-noise the final sample n times to the
  last timestep and take the reward gradient through that single denoising step, averaged over the
  n copies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from .losses import draftp_loss
from .sampler import Denoiser, StepPlan, sample
from .schedulers import StepRule

Decoder = Callable[[torch.Tensor], torch.Tensor]  # latents [B,C,h,w] -> images [B,3,H,W] in [0,1]
Scorer = Callable[[torch.Tensor], torch.Tensor]  # images -> rewards [B]


@dataclass
class DraftConfig:
    """The DRaFT family's parameters (NeMo-Aligner's model-level keys; ranges are checked once, where the
    config is validated). ``checkpoint``: per-step gradient checkpointing of the sampler; ``lv_copies``
    > 0 selects DRaFT-LV with this many re-noised copies of the last step (``truncation_steps`` is then
    unused); ``decode_target``: decode the last step's x̂0 (``pred_x0``, NeMo-Aligner) or the sample."""

    truncation_steps: int = 1
    kl_coeff: float = 0.0
    eta: float = 0.0
    checkpoint: bool = False
    decode_target: str = "pred_x0"
    lv_copies: int = 0


def draft_objective(
    policy: Denoiser,
    reference: Optional[Denoiser],
    rule: StepRule,
    latents: torch.Tensor,
    decode: Decoder,
    score: Scorer,
    cfg: DraftConfig,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]:
    """One DRaFT(+)/-LV rollout. Returns (loss, metrics, decoded images ``[B,3,H,W]``)."""
    if cfg.kl_coeff and reference is None:
        # Without this check DRaFT-LV would silently drop the penalty.
        raise ValueError(f"kl_coeff = {cfg.kl_coeff} needs a reference denoiser (DRaFT+); "
                         f"pass one, or set kl_coeff to 0 for plain DRaFT")
    ref = reference if cfg.kl_coeff else None
    if cfg.lv_copies:
        return _draft_lv(policy, ref, rule, latents, decode, score, cfg, generator)
    plan = StepPlan.last_k(rule.num_steps, cfg.truncation_steps)
    out = sample(policy, rule, latents, plan, reference=ref, eta=cfg.eta, generator=generator,
                 checkpoint=cfg.checkpoint)
    images = decode(out.pred_x0 if cfg.decode_target == "pred_x0" else out.latents)
    rewards = score(images)
    loss, metrics = draftp_loss(rewards, out.eps, out.eps_ref, cfg.kl_coeff)
    return loss, metrics, images


def _draft_lv(policy, reference, rule, latents, decode, score, cfg, generator):
    last = rule.num_steps - 1
    with torch.no_grad():
        base = sample(policy, rule, latents, StepPlan.no_grad(rule.num_steps), eta=cfg.eta,
                      generator=generator)
    x0 = base.latents
    losses, metrics_list, images = [], [], None
    for _ in range(cfg.lv_copies):
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x1 = rule.add_noise(x0, noise, last)
        out = policy(rule.scale_model_input(x1, last), rule.timesteps[last])
        eps, x0_hat = rule.split_output(out, x1, last)
        eps_ref = []
        if reference is not None:
            with torch.no_grad():
                ref_out = reference(rule.scale_model_input(x1, last), rule.timesteps[last])
                eps_ref = [rule.split_output(ref_out, x1, last)[0]]
        imgs = decode(x0_hat)
        loss, m = draftp_loss(score(imgs), [eps] if reference is not None else [], eps_ref, cfg.kl_coeff)
        losses.append(loss)
        metrics_list.append(m)
        images = imgs if images is None else images
    loss = torch.stack(losses).mean()
    metrics = {k: torch.stack([m[k] for m in metrics_list]).mean() for k in metrics_list[0]}
    metrics["loss"] = loss.detach()
    return loss, metrics, images
