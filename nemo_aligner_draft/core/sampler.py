"""Sampling with gradients: one loop for DRaFT(+)/-K/-LV, AlignProp, DDPO rollouts and SDXL.

Which steps carry gradient is described by a :class:`StepPlan` (one flag pair per step), so every
truncation scheme is data, not a code path:

* DRaFT-K: ``StepPlan.last_k(T, K)`` — steps ``< T−K`` run under ``no_grad``.
* AlignProp (one cut per rollout): ``StepPlan.from_cut(T, cut)``.
* AlignProp (original, per-step redraw): ``StepPlan.per_step_detach(mask)`` — every step runs with
  autograd on, but the UNet *output* is detached where ``mask[i]``; the gradient still flows through
  the latent chain x_i → x_{i+1}.

With ``checkpoint=True`` each step with gradient (the UNet call and the step rule) is recomputed in
the backward pass instead of stored, so full-chain backprop costs memory flat in T. Two ways:

* exact step checkpointing (:class:`_CheckpointedStep`), used when the denoiser names the tensors it
  reads that may require grad (its ``grad_tensors`` attribute, see :func:`denoiser_grad_tensors`): the
  step's forward runs under ``no_grad`` and records one autograd node, whose backward recomputes the
  step and returns the gradients of x and of those tensors. The graph of a T-step chain then has O(1)
  nodes per step, and each trainable parameter's AccumulateGrad runs once per backward (DDP-safe).
* otherwise ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``, which drops the saved tensors
  but still records every op's node of the step (hundreds per UNet call), so the graph grows with T.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint as _checkpoint
from torch.utils.checkpoint import get_device_states, set_device_states

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


# ----------------------------------------------------------------------------- exact step checkpointing
#: Module switch: False sends every checkpointed step to torch's non-reentrant checkpoint, whatever the
#: denoiser declares (for A/B measurements; a backend switches itself off with its own attribute).
EXACT_STEP_CHECKPOINT = True


def tensors_requiring_grad(*trees) -> List[torch.Tensor]:
    """The tensors in ``trees`` (tensors, or dicts / other iterables of them, nested) that require
    grad, each once (by identity), in order of first appearance."""
    out, seen = [], set()

    def visit(t):
        if torch.is_tensor(t):
            if t.requires_grad and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        elif isinstance(t, dict):
            for v in t.values():
                visit(v)
        elif isinstance(t, (list, tuple)) or hasattr(t, "__next__"):
            for v in t:
                visit(v)

    for tree in trees:
        visit(tree)
    return out


def denoiser_grad_tensors(denoiser) -> Optional[List[torch.Tensor]]:
    """The tensors other than its input that ``denoiser`` reads and that require grad (trainable
    parameters, conditioning that requires grad), or None where the denoiser does not say.

    Protocol: ``denoiser.grad_tensors`` is a list of tensors, or a zero-argument callable returning one
    (evaluated when sampling starts, so ``requires_grad`` set after the denoiser was made counts).
    Tensors that do not require grad are dropped, duplicates kept once. The list must be complete: a
    tensor the denoiser reads that requires grad but is not listed would get no gradient through an
    exactly checkpointed step — the first recomputation of each chain checks this and raises."""
    listed = getattr(denoiser, "grad_tensors", None)
    if listed is None:
        return None
    if callable(listed):
        listed = listed()
    return tensors_requiring_grad(listed)


def _autocast_state(device: torch.device):
    """The autocast settings in force now, for CPU, the tensors' device and CUDA (if present)."""
    types = ["cpu"]
    for t in (device.type, "cuda" if torch.cuda.is_available() else None):
        if t and t not in types and torch.amp.is_autocast_available(t):
            types.append(t)
    return ([(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in types],
            torch.is_autocast_cache_enabled())


@contextlib.contextmanager
def _autocast_restored(state):
    settings, cache_enabled = state
    with contextlib.ExitStack() as stack:
        for device_type, enabled, dtype in settings:
            stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled,
                                               cache_enabled=cache_enabled))
        yield


@contextlib.contextmanager
def _rng_restored(state):
    """Run the block with the RNG state of the step's forward (as torch's checkpoint does); the
    surrounding state is restored after it."""
    cpu_state, device_type, devices, device_states = state
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        torch.set_rng_state(cpu_state)
        if devices:
            set_device_states(devices, device_states, device_type=device_type)
        yield


def _unlisted_leaves(outputs, listed: List[torch.Tensor]) -> List[torch.Tensor]:
    """Leaf tensors requiring grad that the graph of ``outputs`` reaches other than through ``listed``."""
    stop = {t.grad_fn for t in listed if t.grad_fn is not None}
    listed_ids = {id(t) for t in listed}
    found, seen = [], set()
    stack = [o.grad_fn for o in outputs if o.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stop:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)  # AccumulateGrad: the edge to a leaf
        if var is not None:
            if id(var) not in listed_ids:
                found.append(var)
            continue
        stack.extend(n for n, _ in node.next_functions)
    return found


class _Chain:
    """What every exactly checkpointed step of one :func:`sample` call shares: the step's callables
    and arguments, and the tensors its gradient goes to besides x (held once, not per step)."""

    def __init__(self, denoiser: Denoiser, rule: StepRule, eta: float, tensors: List[torch.Tensor]):
        self.denoiser, self.rule, self.eta = denoiser, rule, eta
        self.tensors = tensors
        self.versions = [t._version for t in tensors]  # in-place changes before backward are refused
        self.checked = False  # the first recomputation of a live step verifies that `tensors` is complete
        self._last_cpu_rng = None

    def rng_state(self, x: torch.Tensor):
        cpu = torch.get_rng_state()
        if self._last_cpu_rng is not None and torch.equal(cpu, self._last_cpu_rng):
            cpu = self._last_cpu_rng  # no RNG used since the last step: share one copy
        self._last_cpu_rng = cpu
        devices, states = get_device_states(x)
        device_type = x.device.type if devices else "cpu"
        return cpu, device_type, devices, states


class _CheckpointedStep(torch.autograd.Function):
    """One sampler step as a single autograd node. Forward: :func:`model_step` under ``no_grad`` (no
    graph recorded); x and the noise are saved, nothing else. Backward: the step is recomputed with grad
    on, under the forward's autocast and RNG state, and ``torch.autograd.grad`` of the outputs that
    received a gradient returns the gradients of x and of ``chain.tensors``. Those tensors are inputs of
    the node, so the engine that runs the outer backward sums every step's contribution into each leaf
    and runs its AccumulateGrad (and the hooks DDP puts there) once; ``torch.autograd.grad`` on the outer
    loss works as for any graph. Not twice differentiable."""

    @staticmethod
    def forward(ctx, chain: _Chain, i: int, detach_output: bool, x, noise, *tensors):
        ctx.chain, ctx.i, ctx.detach_output = chain, i, detach_output
        ctx.autocast = _autocast_state(x.device)
        ctx.rng = chain.rng_state(x)
        ctx.save_for_backward(x, noise)
        ctx.set_materialize_grads(False)
        with torch.no_grad():
            return model_step(chain.denoiser, chain.rule, x, i, noise, chain.eta, detach_output)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs):
        chain = ctx.chain
        x, noise = ctx.saved_tensors
        for t, v in zip(chain.tensors, chain.versions):
            if t._version != v:
                raise RuntimeError(f"a tensor the denoiser reads (shape {tuple(t.shape)}) was modified in place "
                                   f"between sampling and the recomputation of step {ctx.i} in backward")
        need_x = ctx.needs_input_grad[3]
        need_t = ctx.needs_input_grad[5:]
        wrt = [t for t, need in zip(chain.tensors, need_t) if need]
        with torch.enable_grad(), _rng_restored(ctx.rng), _autocast_restored(ctx.autocast):
            x_in = x.detach().requires_grad_(need_x)
            outs = model_step(chain.denoiser, chain.rule, x_in, ctx.i, noise, chain.eta, ctx.detach_output)
        pairs = [(o, g) for o, g in zip(outs, grad_outputs)
                 if g is not None and torch.is_tensor(o) and o.requires_grad]
        inputs = ([x_in] if need_x else []) + wrt
        if not chain.checked and not ctx.detach_output:
            chain.checked = True
            missing = _unlisted_leaves([o for o, _ in pairs], [x_in, *chain.tensors])
            if missing:
                raise RuntimeError(
                    f"the denoiser reads {len(missing)} tensor(s) that require grad but are not in its "
                    f"grad_tensors (shapes {[tuple(m.shape) for m in missing[:5]]}): their gradient would be "
                    f"lost. List them in denoiser.grad_tensors, or drop the attribute (or set "
                    f"sampler.EXACT_STEP_CHECKPOINT = False) to use torch's checkpoint")
        if pairs and inputs:
            grads = iter(torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs],
                                             allow_unused=True))
        else:
            grads = iter([None] * len(inputs))
        g_x = next(grads) if need_x else None
        g_t = [next(grads) if need else None for need in need_t]
        return (None, None, None, g_x, None, *g_t)


def _exact_chain(denoiser: Denoiser, rule: StepRule, eta: float) -> Optional[_Chain]:
    """The shared state of exact step checkpointing, or None where torch's checkpoint must be used."""
    if not EXACT_STEP_CHECKPOINT:
        return None
    tensors = denoiser_grad_tensors(denoiser)
    return None if tensors is None else _Chain(denoiser, rule, eta, tensors)


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

    checkpoint: recompute each step with gradient in backward. Exact (one autograd node per step,
    :class:`_CheckpointedStep`) when the denoiser declares ``grad_tensors`` and
    :data:`EXACT_STEP_CHECKPOINT` is on; otherwise torch's non-reentrant checkpoint. Both give the
    gradients of the plain loop.
    """
    if plan.num_steps != rule.num_steps:
        raise ValueError(f"plan has {plan.num_steps} steps but the sampler has {rule.num_steps}")
    x = latents
    out = SampleOutput(latents=x, pred_x0=x)
    traj = [x.detach()] if keep_trajectory else None
    log_probs = []
    deterministic_at = None  # the first step without a log-probability (eta > 0: a DDIM step landing on ᾱ = 1)
    # exact step checkpointing: one chain for every checkpointed step of this call (None: torch's checkpoint)
    chain = _exact_chain(denoiser, rule, eta) if checkpoint and any(plan.grad) else None
    for i in range(rule.num_steps):
        noise = None
        if eta > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if not plan.grad[i]:
            with torch.no_grad():
                x_next, eps, x0, lp = model_step(denoiser, rule, x, i, noise, eta)
        elif checkpoint:
            if chain is not None:
                x_next, eps, x0, lp = _CheckpointedStep.apply(chain, i, plan.detach_output[i], x, noise,
                                                              *chain.tensors)
            else:
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
            if deterministic_at is not None:
                raise ValueError(f"step {i} is stochastic after the deterministic step {deterministic_at}: the "
                                 f"log-probabilities would not line up with the steps")
            log_probs.append(lp.detach())
        elif eta > 0 and deterministic_at is None:
            deterministic_at = i
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
