"""One optimizer step from accumulated micro-batch gradients, guarded — shared by every recipe.

A recipe calls :meth:`OptimizerStep.backward` for each micro-batch (or train micro-batch) of a window
and :meth:`OptimizerStep.finish` at its end. ``finish``:

* drops the window's gradients and skips the step when any of its losses, or the global gradient norm,
  was not finite (the NaN guard), counting it; ``nan_tolerance`` such windows in a row raise
  ``FloatingPointError`` (the CLI's exit code 3); weights and optimizer state stay those of the last
  finite step;
* otherwise clips the global gradient norm (``gradient_clip_val`` > 0), steps the optimizer and the LR
  schedule, and logs the window's metrics (mean over its micro-batches; ``reward_std`` pooled).

State that must survive a resume (``nan_skipped_steps``) lives on the model, which checkpoints it.
"""
from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional

import torch

_log = logging.getLogger("nemo_aligner_draft")


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
        """Backpropagate ``loss · scale`` (the share of this micro-batch in the step) if it is finite."""
        self.start()
        if bool(torch.isfinite(loss)):
            if not loss.requires_grad:
                # every rank must run backward for DDP's gradient all-reduce; a loss without a graph
                # (AlignProp with every network output detached) contributes zero
                loss = loss + 0.0 * sum(p.sum() for p in self.model.backend.trainable_parameters())
            self.model.manual_backward(loss * scale)
        else:
            self.bad = True
        self.metrics.append({k: torch.as_tensor(v).detach().float() for k, v in metrics.items()})

    def finish(self, extra: Optional[Dict] = None) -> Optional[Dict[str, float]]:
        """End the window: step (returning the logged metrics) or skip it (returning None)."""
        model = self.model
        metrics = window_mean(self.metrics) if self.metrics else {}
        metrics.update(extra or {})
        self.metrics = []
        opt, sched = model.optimizers(), model.lr_schedulers()
        grads = [p.grad for p in model.backend.trainable_parameters() if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])) if grads else torch.zeros(())
        bad = self.bad or not bool(torch.isfinite(grad_norm))
        self.bad = False
        if bad:
            self._skip(opt)
            return None
        self.consecutive_bad = 0
        if self.gradient_clip_val > 0:
            model.clip_gradients(opt, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
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
