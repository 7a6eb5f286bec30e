"""AlignProp (Prabhudesai et al. 2023, arXiv 2310.03739): reward backpropagation through the
whole sampling chain with randomized truncation and per-step gradient checkpointing.

Two truncation schemes, both expressed as a :class:`~.sampler.StepPlan`:

* ``per_step`` (the original release): at every step i a fresh cut ``c_i ~ U{lo, …, hi}`` (both
  ends included, default 0…50 for 50 steps) is drawn and the UNet *output* of step i is detached
  when ``i < c_i``. The step still runs with autograd on, so the gradient keeps flowing along the
  latent chain x_i → x_{i+1}; only the path through that UNet call's parameters is cut.
  P(step i detached) = (hi − i) / (hi − lo + 1) for lo ≤ i ≤ hi.
* one cut per rollout (the later release): ``gaussian`` (cut ~ round N(mean, std²), default 42 ± 5
  of 50), ``uniform`` (cut ~ U{min, …, max}) or ``fixed`` (default 49 of 50, i.e. DRaFT-K with K=1);
  steps ``< cut`` run under no_grad, steps ``≥ cut`` carry gradient (``StepPlan.from_cut``).

Cut values are given for ``reference_steps`` sampler steps (50 in the paper's configs) and scaled
to the actual number of steps T: ``c_T = round(c · T / reference_steps)``. One-cut draws are
clipped to [0, T−1] so at least the last step carries gradient.

Loss (§3): the reward turned into a loss by :func:`~.losses.reward_to_loss` (``negate``:
−coeff·mean r; ``target``: coeff·mean |r − target|), plus the optional DRaFT+ ε penalty to a frozen
reference when ``kl_coeff > 0`` (not part of AlignProp; off by default).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..typed import Section, setting
from .losses import eps_penalty, objective_metrics, reward_to_loss
from .sampler import Denoiser, StepPlan, sample
from .schedulers import StepRule

Decoder = Callable[[torch.Tensor], torch.Tensor]
Scorer = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class AlignPropConfig(Section):
    """AlignProp's truncation and reward-to-loss options (its config section). Cut values are
    in units of a ``reference_steps``-step schedule and scaled to the sampler's steps."""

    truncation: str = setting("per_rollout", choices=("per_step", "per_rollout"),
                              doc="per_step: the original release's redraw per step; per_rollout: one cut per rollout")
    cut_distribution: str = setting("gaussian", choices=("gaussian", "uniform", "fixed"),
                                    doc="per_rollout cuts: round N(cut_mean, cut_std²), U{cut_min..cut_max}, or fixed_cut")
    cut_mean: float = setting(42.0)
    cut_std: float = setting(5.0, ge=0)
    cut_min: int = setting(0, doc="uniform cuts (and per_step redraws) lie in [cut_min, cut_max]")
    cut_max: int = setting(50)
    fixed_cut: int = setting(49, doc="cut_distribution=fixed: gradient on steps >= fixed_cut (49 of 50 = K=1)")
    reference_steps: int = setting(50, ge=1, doc="the schedule length the cut values refer to")
    loss_mode: str = setting("negate", choices=("negate", "target"))
    loss_target: float = setting(0.0)
    loss_coeff: float = setting(1.0)

    def rules(self):
        if self.cut_min > self.cut_max:
            yield "cut_min", f"got {self.cut_min}, expected <= cut_max={self.cut_max}"


def _scale(value: float, num_steps: int, reference_steps: int) -> int:
    return int(round(value * num_steps / reference_steps))


def _randint(lo: int, hi: int, generator: Optional[torch.Generator]) -> int:
    """Uniform integer in [lo, hi], both ends included."""
    return int(torch.randint(lo, hi + 1, (1,), generator=generator))


def draw_cut(cfg: AlignPropConfig, num_steps: int, generator: Optional[torch.Generator] = None) -> int:
    """One cut per rollout (``gaussian``/``uniform``/``fixed``), in [0, T−1]; gradient on steps ≥ cut."""
    if cfg.truncation != "per_rollout":
        raise ValueError(f"draw_cut needs one-cut (per_rollout) truncation, got {cfg.truncation!r}")
    mode = cfg.cut_distribution
    if mode == "gaussian":
        raw = cfg.cut_mean + cfg.cut_std * float(torch.randn((), generator=generator))
        cut = _scale(raw, num_steps, cfg.reference_steps)
    elif mode == "uniform":
        cut = _randint(_scale(cfg.cut_min, num_steps, cfg.reference_steps),
                       _scale(cfg.cut_max, num_steps, cfg.reference_steps), generator)
    else:
        cut = _scale(cfg.fixed_cut, num_steps, cfg.reference_steps)
    return min(max(cut, 0), num_steps - 1)


def draw_detach_mask(cfg: AlignPropConfig, num_steps: int,
                     generator: Optional[torch.Generator] = None) -> List[bool]:
    """Original AlignProp: per step i a new cut c_i ~ U{lo…hi} (scaled); detach step i's output if i < c_i."""
    lo = _scale(cfg.cut_min, num_steps, cfg.reference_steps)
    hi = _scale(cfg.cut_max, num_steps, cfg.reference_steps)
    return [i < _randint(lo, hi, generator) for i in range(num_steps)]


def alignprop_plan(cfg: AlignPropConfig, num_steps: int,
                   generator: Optional[torch.Generator] = None) -> StepPlan:
    if cfg.truncation == "per_step":
        return StepPlan.per_step_detach(draw_detach_mask(cfg, num_steps, generator))
    return StepPlan.from_cut(num_steps, draw_cut(cfg, num_steps, generator))


def alignprop_objective(
    policy: Denoiser,
    reference: Optional[Denoiser],
    rule: StepRule,
    latents: torch.Tensor,
    decode: Decoder,
    score: Scorer,
    cfg: AlignPropConfig,
    kl_coeff: float = 0.0,
    eta: float = 0.0,
    decode_target: str = "x0",
    generator: Optional[torch.Generator] = None,
    cut_generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]:
    """One AlignProp rollout with per-step gradient checkpointing. Returns (loss, metrics, images).

    ``generator`` draws the sampler's eta-noise; ``cut_generator`` (a CPU generator) the truncation
    cuts (the global RNG when None). ``reference`` is used only when ``kl_coeff > 0`` (the DRaFT+ ε
    penalty, not part of AlignProp). ``decode_target``: ``x0`` decodes the final sample (AlignProp),
    ``pred_x0`` the last step's x̂0.

    With ``per_step`` truncation every UNet output may be detached (probability ∏_i P(c_i > i),
    e.g. 3.8 % for T = 4 over 0…T); the loss then carries no gradient (``loss.requires_grad`` is
    False, ``metrics["grad_steps"] == 0``) and the caller should skip the backward pass.
    """
    plan = alignprop_plan(cfg, rule.num_steps, cut_generator)
    ref = reference if kl_coeff else None
    out = sample(policy, rule, latents, plan, reference=ref, eta=eta, generator=generator, checkpoint=True)
    images = decode(out.latents if decode_target == "x0" else out.pred_x0)
    rewards = score(images)
    loss = reward_to_loss(rewards, cfg.loss_mode, cfg.loss_target, cfg.loss_coeff)
    penalty = torch.zeros((), device=rewards.device)
    if ref is not None:
        penalty = eps_penalty(out.eps, out.eps_ref).to(rewards.device)
        loss = loss + kl_coeff * penalty
    metrics = {**objective_metrics(loss, rewards, penalty), "grad_steps": torch.tensor(float(len(plan.grad_steps)))}
    return loss, metrics, images
