"""Annealed importance guidance, AIG (Jena et al. 2024, arXiv 2409.06493): an inference-time mix of
the base and the fine-tuned model,

    ε_i = (1 − w_i) ε_base(x_i) + w_i ε_ft(x_i),

with w_i annealed over the sampler steps from the base model (w = 0, first and noisiest step, where
the layout and the diversity are decided) towards the fine-tuned model (w = 1, last step), in the
spirit of annealed importance sampling moving from the prior towards the target.

Schedules, with progress s_i = i / (T − 1) ∈ [0, 1] for step i = 0 … T−1 (s = 1 when T = 1):

* ``linear``: w_i = s_i
* ``power_p`` (e.g. ``power_2``): w_i = s_i^p — stays close to the base longer for p > 1
* ``step_f`` (e.g. ``step_0.6``): w_i = 1 if s_i ≥ f else 0 — base for the first fraction f
* ``constant_c``: w_i = c (plain mixing, for comparison); ``base`` = ``constant_0``, ``draft`` = ``constant_1``
  (NeMo-Aligner's names)

``endpoint=False`` takes NeMo-Aligner's progress s_i = i / T instead (its ``anneal_sdxl.py`` weighs step i by
``i / total``), so its schedules never quite reach the fine-tuned model.

The mix is applied to the raw model outputs (ε or v, CFG already combined); both are linear in the
output, so mixing outputs equals mixing ε̂ for either parameterisation.
"""
from __future__ import annotations

from typing import Optional

import torch

from .sampler import Denoiser
from .schedulers import StepRule


def aig_weights(num_steps: int, schedule: str = "linear", endpoint: bool = True) -> torch.Tensor:
    """w_i for i = 0 … T−1, ``[T]`` float64. ``schedule``, ``endpoint``: see the module docstring."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not endpoint:
        s = torch.arange(num_steps, dtype=torch.float64) / num_steps
    elif num_steps > 1:
        s = torch.linspace(0.0, 1.0, num_steps, dtype=torch.float64)
    else:
        s = torch.ones(1, dtype=torch.float64)
    schedule = {"base": "constant_0", "draft": "constant_1"}.get(schedule, schedule)
    name, _, arg = schedule.partition("_")
    try:
        value = float(arg) if arg else None
    except ValueError:
        value = None
    if name == "linear" and not arg:
        return s
    if name == "power" and value is not None and value > 0:
        return s**value
    if name == "step" and value is not None and 0 <= value <= 1:
        return (s >= value - 1e-12).double()
    if name == "constant" and value is not None and 0 <= value <= 1:
        return torch.full_like(s, value)
    raise ValueError(f"AIG schedule must be 'linear', 'power_<p>' (p > 0), 'step_<f>' (0 ≤ f ≤ 1) or "
                     f"'constant_<c>' (0 ≤ c ≤ 1), got {schedule!r}")


def aig_combine(out_base: torch.Tensor, out_ft: torch.Tensor, weight: float) -> torch.Tensor:
    """(1 − w)·out_base + w·out_ft."""
    return out_base + weight * (out_ft - out_base)


class AIGDenoiser:
    """A :data:`~.sampler.Denoiser` mixing ``base`` and ``finetuned`` with the step's AIG weight.

    The sampler calls ``denoiser(x_in, t)`` with the model timestep; the step index is recovered by
    looking ``t`` up in ``rule.timesteps``. Where w is exactly 0 or 1 only one model is evaluated.
    """

    def __init__(self, base: Denoiser, finetuned: Denoiser, rule: StepRule, schedule: str = "linear",
                 weights: Optional[torch.Tensor] = None):
        self.base, self.finetuned, self.rule = base, finetuned, rule
        self.weights = aig_weights(rule.num_steps, schedule) if weights is None else weights.double()
        if self.weights.shape != (rule.num_steps,):
            raise ValueError(f"AIG weights must have shape [{rule.num_steps}], got {tuple(self.weights.shape)}")

    def step_index(self, t: torch.Tensor) -> int:
        ts = self.rule.timesteps
        t = torch.as_tensor(t)
        hit = (ts.to(torch.float64) - torch.as_tensor(t, dtype=torch.float64).cpu()).abs() < 1e-6
        idx = hit.nonzero().flatten()
        if t.ndim != 0 or len(idx) != 1:
            raise ValueError(f"AIG: timestep {t.tolist()} is not one of the sampler's timesteps {ts.tolist()}")
        return int(idx[0])

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        w = float(self.weights[self.step_index(t)])
        if w == 0.0:
            return self.base(x_in, t)
        if w == 1.0:
            return self.finetuned(x_in, t)
        return aig_combine(self.base(x_in, t), self.finetuned(x_in, t), w)
