"""Differentiable sampler step rules.

A *step rule* turns a model output at step ``i`` of a sampling schedule into the next sample, with
gradients flowing through every tensor operation. Two rules cover the models we support:

* :class:`DDIMRule` — DDIM (Song et al. 2021, eq. 12) with stochasticity ``eta``, used for SD 1.x/2.x.
* :class:`EulerRule` — the Euler/EDM sampler of Karras et al. 2022 (Alg. 1, first-order), used for
  SDXL's ``EulerDiscreteScheduler``.
* :class:`FlowMatchRule` — the rectified-flow Euler step of SD3/FLUX (``FlowMatchEulerDiscreteScheduler``,
  shifted σ schedule), deterministic, or with ``eta`` > 0 the SDE with the same marginals and a Gaussian
  log-density per step (Flow-GRPO's ODE→SDE conversion).

Both expose the same verbs so the sampler and every objective are written once:

``scale_model_input`` → what the UNet sees; ``split_output`` → (ε, x̂0) from the raw UNet output for
either ``epsilon`` or ``v_prediction`` models; ``step`` → x_{i+1} and, for stochastic steps, the
log-density of x_{i+1} under the Gaussian step (DDPO); ``add_noise`` → re-noise x̂0 to step ``i``
(DRaFT-LV).

For the Euler rule the ε returned by ``split_output`` is EDM's "noise" d = (x − D(x))/σ, the quantity
NeMo-Aligner regularises for SDXL; for ε-prediction models it equals the UNet's ε exactly. For the flow
rule it is the velocity v the transformer predicts (see :class:`FlowMatchRule` for how it relates to ε).

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

    def step_distribution(self, x, eps, x0, i, eta: float):
        """(mean, std) of the Gaussian step x_i → x_{i+1}; stochastic rules only."""
        raise NotImplementedError(f"{type(self).__name__} has no step distribution")

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

    def step_distribution(self, x, eps, x0, i, eta: float):
        """Mean and std of x_{i+1} given x_i = ``x`` and the model's (ε̂, x̂0) (std 0 when ``eta`` is 0)."""
        std = self._std(i, x, eta)
        return self._mean(eps, x0, i, std), std

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
                         "policy-gradient methods (DDPO, SDPO, GRPO) need the DDIM sampler (or flow, SD3/FLUX) with eta > 0")

    def add_noise(self, x0, noise, i):
        return x0 + self._sigma(i, x0) * noise


class FlowMatchRule(StepRule):
    """Rectified flow (SD3, FLUX): x_σ = (1 − σ)·x0 + σ·ε on a shifted σ schedule from 1 to 0.

    The network predicts the velocity v = ε − x0, so x̂0 = x − σ·v and ε̂ = x + (1 − σ)·v. On the same
    x, two velocities that differ by Δv imply noises that differ by (1 − σ)·Δv and clean images that
    differ by −σ·Δv: a penalty on v weighs the noisy steps (σ near 1) more than one on ε would.

    ``eta`` = 0: the Euler ODE step x' = x + (σ' − σ)·v, what ``FlowMatchEulerDiscreteScheduler.step``
    computes. ``eta`` = a > 0: the reverse-time SDE with the ODE's marginals,

        dx = [v − ½ g² ∇log p_σ(x)] dσ + g dw̄,   ∇log p_σ(x) = −ε̂ / σ,   g(σ) = a·√(σ / (1 − σ)),

    discretised with Euler–Maruyama: x' ~ N(x + dσ·[v + g²/(2σ)·ε̂], g²·|dσ|), dσ = σ' − σ < 0. g is
    infinite at σ = 1, so the first step's g uses the second σ in the denominator (Flow-GRPO's choice).
    """

    def __init__(self, sigmas: torch.Tensor, timesteps: torch.Tensor):
        self.sigmas = sigmas.double()  # [T + 1], descending, last 0
        self.timesteps = timesteps  # what the transformer is given: σ × num_train_timesteps
        if self.sigmas.shape[0] != self.timesteps.shape[0] + 1:
            raise ValueError(f"a flow rule needs T + 1 sigmas for T timesteps, got {self.sigmas.shape[0]} and "
                             f"{self.timesteps.shape[0]}")
        self.prediction_type = "flow"
        self.stochastic = True

    @classmethod
    def from_diffusers(cls, scheduler, num_steps: int, sigmas=None, mu: Optional[float] = None) -> "FlowMatchRule":
        """The schedule ``FlowMatchEulerDiscreteScheduler.set_timesteps`` makes (shift, or dynamic
        shifting with ``mu``; ``sigmas`` as the FLUX pipeline passes them)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        flow = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        kwargs = {"mu": mu} if mu is not None else {}
        if sigmas is not None:
            kwargs["sigmas"] = list(sigmas)
        flow.set_timesteps(num_steps, **kwargs)
        return cls(flow.sigmas, flow.timesteps)

    def _sigma(self, i: int, ref: torch.Tensor) -> torch.Tensor:
        return self.sigmas[i].to(dtype=ref.dtype, device=ref.device)

    def split_output(self, model_output, x, i):
        """(v, x̂0): the velocity itself (what DRaFT+ penalises on this family) and the clean estimate."""
        return model_output, x - self._sigma(i, x) * model_output

    def _g(self, i: int, eta: float) -> float:
        s = float(self.sigmas[i])
        denom = 1.0 - (s if s < 1.0 else float(self.sigmas[min(1, self.num_steps - 1)]))
        return eta * math.sqrt(s / denom) if denom > 0 else 0.0

    def step_distribution(self, x, v, x0, i, eta: float):
        """Mean and std of x_{i+1} given x_i = ``x`` and velocity ``v`` (std 0 when ``eta`` is 0; ``x0``
        is not needed: the signature is the DDIM rule's)."""
        s, s_next = self._sigma(i, x), self.sigmas[i + 1].to(dtype=x.dtype, device=x.device)
        ds = s_next - s
        if eta <= 0:
            return x + ds * v, torch.zeros((), dtype=x.dtype, device=x.device)
        g = self._g(i, eta)
        eps = x + (1 - s) * v
        mean = x + ds * (v + (g * g / (2 * s)) * eps)
        return mean, (g * (-ds).sqrt()).to(x.dtype)

    def step(self, x, eps, x0, i, noise=None, eta: float = 0.0) -> StepOutput:
        mean, std = self.step_distribution(x, eps, x0, i, eta)
        if eta > 0 and float(std) > 0:
            if noise is None:
                raise ValueError("a stochastic flow step (eta > 0) needs `noise`")
            prev = mean + std * noise
            return StepOutput(prev, gaussian_log_prob(prev.detach(), mean, std))
        return StepOutput(mean, None)

    def step_log_prob(self, x, eps, x0, i, prev_sample, eta: float) -> torch.Tensor:
        """log p_θ(prev_sample | x) of the SDE step (the GRPO policy density). ``[B]``."""
        mean, std = self.step_distribution(x, eps, x0, i, eta)
        if float(std) <= 0:
            raise ValueError("log-probabilities need a stochastic step: set eta > 0 (the SDE noise level)")
        return gaussian_log_prob(prev_sample, mean, std)

    def add_noise(self, x0, noise, i):
        s = self._sigma(i, x0)
        return (1 - s) * x0 + s * noise


def build_step_rule(scheduler, num_steps: int, sampler: str, **flow_kwargs) -> StepRule:
    """``sampler``: ``ddim``, ``euler`` or ``flow`` (``flow_kwargs``: ``sigmas``/``mu`` for the flow schedule)."""
    if sampler == "ddim":
        return DDIMRule.from_diffusers(scheduler, num_steps)
    if sampler == "euler":
        return EulerRule.from_diffusers(scheduler, num_steps)
    if sampler == "flow":
        return FlowMatchRule.from_diffusers(scheduler, num_steps, **flow_kwargs)
    raise ValueError(f"sampler must be 'ddim', 'euler' or 'flow', got {sampler!r}")
