"""fp16 loss scaling in the shared optimizer step (algorithms/optimizer_step.py), tested at the level of
one accumulation window: Lightning refuses ``16-mixed`` on CPU ("AMP with fp16 is not supported on
CPU"), so no Trainer can run it here.

The window sees what it sees under Lightning 2.4's ``MixedPrecision`` plugin with a ``GradScaler``:
``manual_backward`` backpropagates ``scaler.scale(loss)``, and ``opt.step()`` runs the plugin's manual-
optimization branch of ``MixedPrecision.optimizer_step`` (lightning/pytorch/plugins/precision/amp.py,
Lightning 2.4.0): ``scaler.unscale_(opt)``, ``scaler.step(opt)``, ``scaler.update()``.
:class:`PluginOptimizer` does those three calls on a real ``torch.amp.GradScaler("cpu")``; the first test
checks that the installed plugin still makes them, in that order.
"""
import inspect
import logging
from types import SimpleNamespace

import pytest
import torch

from nemo_aligner_draft.algorithms.optimizer_step import MIN_LOSS_SCALE, OptimizerStep


class PluginOptimizer:
    """``model.optimizers()`` under the fp16 plugin (or, with ``scaler=None``, under fp32)."""

    def __init__(self, inner, scaler):
        self.optimizer, self.scaler = inner, scaler

    def step(self):
        if self.scaler is None:
            self.optimizer.step()
            return
        self.scaler.unscale_(self.optimizer)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


class WindowModel:
    """The parts of AlignmentModel an OptimizerStep touches, around one trainable tensor."""

    def __init__(self, scaler=None, value=(0.5, -0.25, 1.0)):
        self.weight = torch.nn.Parameter(torch.tensor(value))
        self.scaler = scaler
        self.trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler))
        self.backend = SimpleNamespace(trainable_parameters=lambda: [self.weight])
        self.opt = PluginOptimizer(torch.optim.SGD([self.weight], lr=0.1), scaler)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt.optimizer, lambda s: 1.0)
        self.consumed_samples, self.nan_skipped_steps, self.overflow_skipped_steps = 0, 0, 0
        self.mcfg = SimpleNamespace(micro_batch_size=1)
        self.logged = {}
        self.clip_calls = 0

    def manual_backward(self, loss):
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def optimizers(self):
        return self.opt

    def lr_schedulers(self):
        return self.sched

    def clip_gradients(self, opt, gradient_clip_val, gradient_clip_algorithm):  # Lightning's, for fp32
        self.clip_calls += 1
        torch.nn.utils.clip_grad_norm_([self.weight], gradient_clip_val)

    def log(self, name, value, **kwargs):
        self.logged[name] = float(value)

    def log_dict(self, logs, **kwargs):
        self.logged.update(logs)


def scaler(init_scale):
    return torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)


def window(model, step, losses):
    for loss_fn in losses:
        step.backward(loss_fn(model.weight), {"loss": torch.tensor(0.0)})
    return step.finish()


def test_the_plugin_still_unscales_steps_and_updates_in_that_order():
    from lightning.pytorch.plugins.precision import MixedPrecision

    src = inspect.getsource(MixedPrecision.optimizer_step)
    calls = [src.index(c) for c in ("self.scaler.unscale_(", "self.scaler.step(", "self.scaler.update()")]
    assert calls == sorted(calls)


def test_clipping_acts_on_unscaled_gradients():
    """Same loss, fp32 vs fp16 with a scale of 2**12: the clipped update and the logged norm are the
    unscaled ones (clipping the scaled gradients instead would clip by 4096× too much)."""
    loss = lambda w: (w * torch.tensor([3.0, -4.0, 12.0])).sum()  # gradient norm 13
    plain, scaled = WindowModel(), WindowModel(scaler(2.0 ** 12))
    logs = [window(m, OptimizerStep(m, gradient_clip_val=1.0, nan_tolerance=3), [loss]) for m in (plain, scaled)]
    assert plain.clip_calls == scaled.clip_calls == 0  # clipped by the step itself, not Lightning's plugin
    torch.testing.assert_close(scaled.weight.detach(), plain.weight.detach(), rtol=1e-6, atol=1e-7)
    # torch's own clip_grad_norm_ on the same gradient is the reference
    ref = torch.nn.Parameter(torch.tensor([0.5, -0.25, 1.0]))
    loss(ref).backward()
    torch.nn.utils.clip_grad_norm_([ref], 1.0)
    torch.testing.assert_close(plain.weight.detach(), ref.detach() - 0.1 * ref.grad, rtol=0, atol=1e-7)
    assert logs[0]["grad_norm"] == pytest.approx(13.0) and logs[1]["grad_norm"] == pytest.approx(13.0)


def test_an_overflow_lowers_the_scale_skips_the_update_and_is_not_a_nan_step(caplog):
    """Gradient 1e36 × scale 2**16 overflows fp32. The scaler skips the update and halves the scale;
    more overflows than nan_tolerance do not stop the run while the scale can still come down; once it
    is small enough (2**8: 2.6e38 is finite) the same loss trains."""
    loss = lambda w: w.sum() * 1e36
    m = WindowModel(scaler(2.0 ** 16))
    step = OptimizerStep(m, gradient_clip_val=1.0, nan_tolerance=2)
    before = m.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="nemo_aligner_draft"):
        for k in range(1, 9):
            assert window(m, step, [loss]) is None
            assert torch.equal(m.weight.detach(), before)
            assert m.scaler.get_scale() == 2.0 ** (16 - k)
            assert (m.overflow_skipped_steps, m.nan_skipped_steps) == (k, 0)
            assert m.sched.last_epoch == 0  # the LR schedule does not advance on a skipped update
    assert "loss scale 65536 -> 32768" in caplog.text
    assert m.logged["overflow_skipped_steps"] == 8.0 and m.logged["loss_scale"] == 2.0 ** 8
    # each scaled gradient is finite, their fp32 norm (4.4e38) is not: the norm is taken in float64
    logs = window(m, step, [loss])
    assert logs is not None and m.overflow_skipped_steps == 8 and m.sched.last_epoch == 1
    assert logs["grad_norm"] == pytest.approx(3 ** 0.5 * 1e36, rel=1e-6)
    assert abs((m.weight.detach() - before).norm().item() - 0.1) < 1e-5


def test_an_overflow_at_the_bottom_scale_counts_towards_nan_tolerance():
    """Two micro-batches of gradient 3e38 each overflow fp32 even unscaled: at scale ≤ MIN_LOSS_SCALE
    there is nothing left to lower, so the window counts, and nan_tolerance of them stop the run."""
    loss = lambda w: w.sum() * 3e38
    m = WindowModel(scaler(MIN_LOSS_SCALE), value=(0.5,))
    step = OptimizerStep(m, gradient_clip_val=0.0, nan_tolerance=2)
    assert window(m, step, [loss, loss]) is None
    assert (m.nan_skipped_steps, m.overflow_skipped_steps) == (1, 0)
    with pytest.raises(FloatingPointError, match="model.nan_tolerance=2"):
        window(m, step, [loss, loss])


def test_a_non_finite_loss_is_a_nan_step_with_or_without_a_scaler():
    m = WindowModel(scaler(2.0 ** 16))
    step = OptimizerStep(m, gradient_clip_val=1.0, nan_tolerance=5)
    assert window(m, step, [lambda w: w.sum() * float("nan")]) is None
    assert (m.nan_skipped_steps, m.overflow_skipped_steps) == (1, 0) and m.scaler.get_scale() == 2.0 ** 16
