"""One optimizer step from accumulated micro-batch gradients, guarded — shared by every recipe.

A recipe calls :meth:`OptimizerStep.backward` for each micro-batch (or train micro-batch) of a window
and :meth:`OptimizerStep.finish` at its end. ``finish``:

* drops the window's gradients and skips the step when any of its losses, or the global gradient norm,
  was not finite (the NaN guard), counting it; ``nan_tolerance`` such windows in a row raise
  ``FloatingPointError`` (the CLI's exit code 3); weights and optimizer state stay those of the last
  finite step;
* otherwise clips the global gradient norm (``gradient_clip_val`` > 0; torch's ``clip_grad_norm_`` rule,
  applied here rather than through Lightning, whose FSDP precision plugin refuses norm clipping), steps
  the optimizer and the LR schedule, and logs the window's metrics (mean over its micro-batches;
  ``reward_std`` pooled).

fp16 (``16-mixed``) trains through a loss scaler (Lightning's ``MixedPrecision`` plugin holds a
``GradScaler``; ``manual_backward`` scales the loss and ``opt.step()`` unscales, steps unless a gradient
is inf/NaN, and updates the scale). With a scaler the gradients seen here are scaled, so:

* the global norm is divided by the scale before it is logged or clipped, and clipping multiplies the
  scaled gradients by ``max_norm / true_norm`` — the same factor torch's ``clip_grad_norm_`` would apply
  to the unscaled ones, and the plugin's unscale afterwards is linear;
* a finite loss whose gradients overflowed is a *scale* overflow: ``opt.step()`` still runs, so the
  scaler skips the update and halves its scale, and the window does not count towards
  ``nan_tolerance`` — unless the scale has bottomed out (≤ :data:`MIN_LOSS_SCALE`), when no further
  lowering can help and it counts as any other non-finite step. The LR schedule does not advance on a
  skipped update (Megatron's rule).
* a non-finite *loss* is not a scaling problem (the forward pass overflowed): it is skipped and counted
  as without a scaler.

State that must survive a resume (``nan_skipped_steps``, ``overflow_skipped_steps``) lives on the
model, which checkpoints it; the scaler's state is checkpointed by Lightning with the precision plugin.
"""
from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional

import torch

_log = logging.getLogger("nemo_aligner_draft")

# A loss scale at or below this cannot be lowered usefully: an overflow there is a real non-finite step.
MIN_LOSS_SCALE = 1.0


def grad_scaler(model):
    """The trainer's enabled loss scaler (fp16 mixed precision), or None (fp32, bf16, no trainer)."""
    try:
        plugin = model.trainer.precision_plugin
    except (AttributeError, RuntimeError):  # a LightningModule not attached to a Trainer raises RuntimeError
        return None
    scaler = getattr(plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP's parameters and gradients); a plain tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def window_mean(window: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Metrics of one optimizer step from those of its equal-sized micro-batches: the mean of each,
    except ``reward_std``, which is pooled (the population std of all the window's rewards)."""
    out = {k: torch.stack([torch.as_tensor(m[k]).float() for m in window]).mean() for k in window[0]}
    if "reward_std" in out and "reward_mean" in out:
        # within-micro-batch variance plus the spread of the micro-batch means (no E[x²] − E[x]² cancellation)
        var = torch.stack([torch.as_tensor(m["reward_std"]).float() ** 2 +
                           (torch.as_tensor(m["reward_mean"]).float() - out["reward_mean"]) ** 2
                           for m in window]).mean()
        out["reward_std"] = var.sqrt()
    return out


def global_grad_norm(model, grads: List[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all trainable gradients, in float64 (scaled fp16-run gradients near the fp32 limit
    are finite while their fp32 norm need not be). When each rank holds a shard of the gradients
    (``model.gradients_sharded``: FSDP) the squares are summed over the data-parallel group; under DDP
    every rank holds the all-reduced gradients and its own norm is the global one."""
    # a rank whose shard holds no gradient still joins the all-reduce, on the model's device (NCCL)
    sq = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else getattr(model, "device", None))
    for g in grads:  # a DTensor gradient (FSDP) contributes its local shard; the all-reduce sums them
        sq = sq + torch.linalg.vector_norm(local_shard(g), dtype=torch.float64) ** 2
    if getattr(model, "gradients_sharded", False) and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sq, group=getattr(model, "dp_group", None))
    return sq.sqrt()


def agree_across_ranks(model, *flags: bool) -> List[bool]:
    """Each flag true on any data-parallel rank is true on all: ranks take or skip a step together
    (a non-finite loss on one rank would otherwise step the others' weights away from its own)."""
    dp = getattr(model, "dp_size", 1)
    if dp <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=getattr(model, "device", None))
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=getattr(model, "dp_group", None))
    return [bool(v) for v in t.tolist()]


class OptimizerStep:
    """Accumulates one window's gradients and metrics, then takes (or skips) the step."""

    def __init__(self, model, gradient_clip_val: float, nan_tolerance: int):
        self.model = model
        self.gradient_clip_val = float(gradient_clip_val)
        self.nan_tolerance = int(nan_tolerance)
        self.metrics: List[Dict[str, torch.Tensor]] = []
        self.bad = False
        self.consecutive_bad = 0
        self.started: Optional[float] = None

    def start(self) -> None:
        """Mark the start of a window's work (step_time counts from here)."""
        if self.started is None:
            self.started = time.perf_counter()

    def backward(self, loss: torch.Tensor, metrics: Dict, scale: float = 1.0) -> None:
        """Backpropagate ``loss · scale`` (the share of this micro-batch in the step); a non-finite loss
        marks the window bad and is backpropagated as zero.

        Every rank runs a backward for every micro-batch, whatever its loss: DDP's gradient all-reduce
        is a collective, and a rank that skipped it would leave the others waiting. A loss without a
        graph (AlignProp with every network output detached) or a non-finite one contributes zero."""
        self.start()
        finite = bool(torch.isfinite(loss))
        if not finite:
            self.bad = True
        if not finite or not loss.requires_grad:
            loss = 0.0 * sum(local_shard(p).sum() for p in self.model.backend.trainable_parameters())
        self.model.manual_backward(loss * scale)
        self.metrics.append({k: torch.as_tensor(v).detach().float() for k, v in metrics.items()})

    def finish(self, extra: Optional[Dict] = None) -> Optional[Dict[str, float]]:
        """End the window: step (returning the logged metrics) or skip it (returning None)."""
        model = self.model
        metrics = window_mean(self.metrics) if self.metrics else {}
        metrics.update(extra or {})
        self.metrics = []
        opt, sched = model.optimizers(), model.lr_schedulers()
        scaler = grad_scaler(model)
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        grads = [p.grad for p in model.backend.trainable_parameters() if p.grad is not None]
        grad_norm = (global_grad_norm(model, grads) / scale).float()
        bad_loss, overflow = agree_across_ranks(model, self.bad, not bool(torch.isfinite(grad_norm)))
        self.bad = False
        if bad_loss or (overflow and (scaler is None or scale <= MIN_LOSS_SCALE)):
            self._skip(opt)
            return None
        if overflow:  # fp16: the scaler skips the update and lowers its scale
            opt.step()
            opt.zero_grad(set_to_none=True)
            self._overflow(scale, float(scaler.get_scale()))
            return None
        self.consecutive_bad = 0
        if self.gradient_clip_val > 0 and float(grad_norm) > self.gradient_clip_val:
            # torch's clip_grad_norm_ rule on the global norm: with sharded gradients (FSDP) that norm spans
            # every rank's shard, and with a loss scaler the factor applies to the scaled gradients alike
            factor = self.gradient_clip_val / (float(grad_norm) + 1e-6)
            for g in grads:
                g.mul_(factor)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        now = time.perf_counter()
        step_time = now - self.started if self.started else float("nan")
        self.started = now  # the next window's work starts now
        logs = {("train_loss" if k == "loss" else k): float(v) for k, v in metrics.items()}
        logs.update(grad_norm=float(grad_norm), lr=float(sched.get_last_lr()[0]), step_time=step_time,
                    consumed_samples=float(model.consumed_samples))
        if "train_loss" in logs:  # NeMo-Aligner's name, for its checkpoint monitor and file names
            logs["reduced_train_loss"] = logs["train_loss"]
        batch = model.mcfg.micro_batch_size
        model.log_dict(logs, prog_bar=False, on_step=True, batch_size=batch)
        if "reward_mean" in logs:
            model.log("reward", logs["reward_mean"], prog_bar=True, on_step=True, batch_size=batch)
        return logs

    def _overflow(self, scale: float, new_scale: float) -> None:
        model = self.model
        self.started = time.perf_counter()
        model.overflow_skipped_steps += 1
        model.log("overflow_skipped_steps", float(model.overflow_skipped_steps), prog_bar=False)
        model.log("loss_scale", new_scale, prog_bar=False)
        _log.info(f"fp16 gradient overflow at consumed_samples={model.consumed_samples}: update skipped, loss "
                  f"scale {scale:g} -> {new_scale:g} (not counted towards model.nan_tolerance)")

    def _skip(self, opt) -> None:
        model = self.model
        opt.zero_grad(set_to_none=True)
        self.started = time.perf_counter()
        model.nan_skipped_steps += 1
        self.consecutive_bad += 1
        model.log("nan_skipped_steps", float(model.nan_skipped_steps), prog_bar=True)
        _log.warning(f"non-finite loss or gradient at consumed_samples={model.consumed_samples}: optimizer "
                     f"step skipped ({self.consecutive_bad} in a row, {model.nan_skipped_steps} in total, "
                     f"model.nan_tolerance={self.nan_tolerance})")
        if self.consecutive_bad >= self.nan_tolerance:
            raise FloatingPointError(
                f"{self.consecutive_bad} consecutive steps had a non-finite loss or gradient "
                f"(model.nan_tolerance={self.nan_tolerance}); stopping. Weights and optimizer "
                f"state are those of the last finite step.")
