"""Differentiable sampler step rules.

A *step rule* turns a model output at step ``i`` of a sampling schedule into the next sample, with
gradients flowing through every tensor operation. Two rules cover the models we support:

* :class:`DDIMRule` — DDIM (Song et al. 2021, eq. 12) with stochasticity ``eta``, used for SD 1.x/2.x.
* :class:`EulerRule` — the Euler/EDM sampler of Karras et al. 2022 (Alg. 1, first-order), used for
  SDXL's ``EulerDiscreteScheduler``.

Both expose the same verbs so the sampler and every objective are written once:

``scale_model_input`` → what the UNet sees; ``split_output`` → (ε, x̂0) from the raw UNet output for
either ``epsilon`` or ``v_prediction`` models; ``step`` → x_{i+1} and, for stochastic steps, the
log-density of x_{i+1} under the Gaussian step (DDPO); ``add_noise`` → re-noise x̂0 to step ``i``
(DRaFT-LV).

For the Euler rule the ε returned by ``split_output`` is EDM's "noise" d = (x − D(x))/σ, the quantity
NeMo-Aligner regularises for SDXL; for ε-prediction models it equals the UNet's ε exactly.

Shapes: latents ``[B, C, h, w]``; per-sample scalars are broadcast as ``[B, 1, 1, 1]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class StepOutput:
    """Result of one sampler step.

    prev_sample: the next latent x_{i+1} ``[B, C, h, w]``.
    log_prob: log-density of ``prev_sample`` under the step's Gaussian, averaged over latent
        dimensions ``[B]`` (None for deterministic steps).
    """

    prev_sample: torch.Tensor
    log_prob: Optional[torch.Tensor] = None


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Mean over non-batch dims of log N(x; mean, std²). ``std`` broadcastable to ``x``. Returns ``[B]``."""
    std = std.expand_as(x) if torch.is_tensor(std) else torch.full_like(x, float(std))
    log_p = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_p.mean(dim=tuple(range(1, x.ndim)))


class StepRule:
    """Common interface; see module docstring."""

    timesteps: torch.Tensor  # model timesteps, descending, [T]
    prediction_type: str
    stochastic: bool = False

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def init_noise_sigma(self) -> float:
        return 1.0

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x

    def split_output(self, model_output: torch.Tensor, x: torch.Tensor, i: int):
        raise NotImplementedError

    def step(self, x, eps, x0, i, noise=None, eta: float = 0.0) -> StepOutput:
        raise NotImplementedError

    def step_log_prob(self, x, eps, x0, i, prev_sample, eta: float) -> torch.Tensor:
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        raise NotImplementedError


def _check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
        )
    return prediction_type


class DDIMRule(StepRule):
    """DDIM with eta (Song et al. 2021, eq. 12 and 16).

    ``alphas_cumprod``: ᾱ over the training timesteps ``[N]``; ``timesteps``: the sampling
    timesteps (descending). After the last step the sample lands on ``final_alpha_cumprod``.
    """

    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        timesteps: torch.Tensor,
        final_alpha_cumprod: float,
        prediction_type: str = "epsilon",
    ):
        self.alphas_cumprod = alphas_cumprod.double()
        self.timesteps = timesteps.long()
        self.final_alpha_cumprod = float(final_alpha_cumprod)
        self.prediction_type = _check_prediction_type(prediction_type)
        self.stochastic = True

    @classmethod
    def from_diffusers(cls, scheduler, num_steps: int) -> "DDIMRule":
        """Build from any diffusers scheduler carrying ``alphas_cumprod`` (DDIM/PNDM/DDPM configs)."""
        from diffusers import DDIMScheduler

        ddim = DDIMScheduler.from_config(scheduler.config)
        ddim.set_timesteps(num_steps)
        final = 1.0 if ddim.config.set_alpha_to_one else float(ddim.alphas_cumprod[0])
        return cls(ddim.alphas_cumprod, ddim.timesteps, final, ddim.config.prediction_type)

    def _alpha(self, i: int, ref: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod[self.timesteps[i]].to(ref.dtype)

    def _alpha_prev(self, i: int, ref: torch.Tensor) -> torch.Tensor:
        if i + 1 < self.num_steps:
            return self.alphas_cumprod[self.timesteps[i + 1]].to(ref.dtype)
        return torch.tensor(self.final_alpha_cumprod, dtype=ref.dtype)

    def split_output(self, model_output, x, i):
        """Return (ε̂, x̂0) from the raw model output at step ``i``."""
        a = self._alpha(i, x).to(x.device)
        sa, s1a = a.sqrt(), (1 - a).sqrt()
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (x - s1a * eps) / sa
        else:  # v = sqrt(a)·ε − sqrt(1−a)·x0  (Salimans & Ho 2022)
            x0 = sa * x - s1a * model_output
            eps = sa * model_output + s1a * x
        return eps, x0

    def _std(self, i: int, x: torch.Tensor, eta: float) -> torch.Tensor:
        a, a_prev = self._alpha(i, x), self._alpha_prev(i, x)
        variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        return (eta * variance.clamp(min=0).sqrt()).to(x.device)

    def _mean(self, eps, x0, i, std):
        a_prev = self._alpha_prev(i, x0).to(x0.device)
        direction = (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
        return a_prev.sqrt() * x0 + direction

    def step(self, x, eps, x0, i, noise=None, eta: float = 0.0) -> StepOutput:
        std = self._std(i, x, eta)
        mean = self._mean(eps, x0, i, std)
        if eta > 0 and float(std) > 0:
            if noise is None:
                raise ValueError("a stochastic DDIM step (eta > 0) needs `noise`")
            prev = mean + std * noise
            return StepOutput(prev, gaussian_log_prob(prev.detach(), mean, std))
        return StepOutput(mean, None)

    def step_log_prob(self, x, eps, x0, i, prev_sample, eta: float) -> torch.Tensor:
        """log p_θ(prev_sample | x) of the Gaussian DDIM step (DDPO's policy density). ``[B]``."""
        std = self._std(i, x, eta)
        if float(std) <= 0:
            raise ValueError("log-probabilities need a stochastic step: set eta > 0")
        return gaussian_log_prob(prev_sample, self._mean(eps, x0, i, std), std)

    def add_noise(self, x0, noise, i):
        a = self._alpha(i, x0).to(x0.device)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


class EulerRule(StepRule):
    """First-order Euler sampler in σ-space (Karras et al. 2022), as diffusers' EulerDiscreteScheduler.

    x_i has std ≈ sqrt(σ_i² + 1); the UNet sees x / sqrt(σ² + 1). Deterministic (no log-prob).
    """

    def __init__(self, sigmas: torch.Tensor, timesteps: torch.Tensor, prediction_type: str = "epsilon",
                 init_sigma: Optional[float] = None):
        self.sigmas = sigmas.double()  # [T + 1], last is 0
        self.timesteps = timesteps
        self.prediction_type = _check_prediction_type(prediction_type)
        self._init_sigma = init_sigma
        self.stochastic = False

    @classmethod
    def from_diffusers(cls, scheduler, num_steps: int) -> "EulerRule":
        from diffusers import EulerDiscreteScheduler

        euler = EulerDiscreteScheduler.from_config(scheduler.config)
        euler.set_timesteps(num_steps)
        return cls(euler.sigmas, euler.timesteps, euler.config.prediction_type,
                   float(euler.init_noise_sigma))

    def init_noise_sigma(self) -> float:
        if self._init_sigma is not None:
            return self._init_sigma
        s = float(self.sigmas.max())
        return (s**2 + 1) ** 0.5

    def _sigma(self, i, ref):
        return self.sigmas[i].to(dtype=ref.dtype, device=ref.device)

    def scale_model_input(self, x, i):
        return x / (self._sigma(i, x) ** 2 + 1).sqrt()

    def split_output(self, model_output, x, i):
        """(d, x̂0) where d = (x − x̂0)/σ is EDM's noise estimate."""
        s = self._sigma(i, x)
        if self.prediction_type == "epsilon":
            x0 = x - s * model_output
        else:
            x0 = model_output * (-s / (s**2 + 1).sqrt()) + x / (s**2 + 1)
        return (x - x0) / s, x0

    def step(self, x, eps, x0, i, noise=None, eta: float = 0.0) -> StepOutput:
        if eta:
            raise ValueError("the Euler sampler is deterministic: eta must be 0")
        dt = self.sigmas[i + 1].to(x) - self._sigma(i, x)
        return StepOutput(x + eps * dt, None)

    def step_log_prob(self, *args, **kwargs):
        raise ValueError("the Euler sampler is deterministic and has no step log-probability; "
                         "policy-gradient methods (DDPO, SDPO) need the DDIM sampler with eta > 0")

    def add_noise(self, x0, noise, i):
        return x0 + self._sigma(i, x0) * noise


def build_step_rule(scheduler, num_steps: int, sampler: str) -> StepRule:
    """``sampler``: ``ddim`` or ``euler``."""
    if sampler == "ddim":
        return DDIMRule.from_diffusers(scheduler, num_steps)
    if sampler == "euler":
        return EulerRule.from_diffusers(scheduler, num_steps)
    raise ValueError(f"sampler must be 'ddim' or 'euler', got {sampler!r}")
