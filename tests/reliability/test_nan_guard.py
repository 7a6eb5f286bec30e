"""NaN/Inf guard (models/base.py): a window whose loss or gradient is not finite is skipped, counted
and logged, leaving weights and Adam state bit-for-bit unchanged; after model.nan_tolerance bad
windows in a row the run stops with a message and exit code 3.

The rewards below are this module's own ``module:callable`` factories (``rm.name=test_nan_guard:...``),
so the whole real path runs: config → reward registry → training step → guard."""
import copy
import json
import logging
import os

import torch

from reliability_helpers import load_ckpt, last_checkpoint, tiny_args


def poisoned_reward(nan_calls=(), inf_calls=(), inf_grad_calls=()):
    """Mean brightness, poisoned on chosen *training* calls (those with a graph; the preflight probe and
    validation run under no_grad and are not counted): NaN value, +Inf value, or a finite value
    (exactly 0 added) whose gradient is infinite (d/dx sqrt(x) at 0)."""
    calls = {"n": 0}

    def reward(images, prompts):
        r = images.float().mean(dim=(1, 2, 3))
        if not torch.is_grad_enabled() or not images.requires_grad:
            return r
        i = calls["n"]
        calls["n"] += 1
        if i in nan_calls:
            return r * float("nan")
        if i in inf_calls:
            return r + float("inf")
        if i in inf_grad_calls:
            m = images.float().mean()
            return r + torch.sqrt(m - m.detach())  # value 0, gradient +inf
        return r

    return reward


def _snapshot(model):
    params = [p.detach().clone() for p in model.backend.trainable_parameters()]
    opt = model.optimizers().optimizer.state_dict()
    return params, copy.deepcopy(opt["state"])


def _equal(a, b):
    pa, oa = a
    pb, ob = b
    same_params = all(torch.equal(x, y) for x, y in zip(pa, pb))
    same_opt = oa.keys() == ob.keys() and all(
        torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    return same_params, same_opt


def test_bad_windows_are_skipped_counted_logged_and_leave_state_untouched(tiny_sd_dir, tmp_path, monkeypatch, caplog):
    from nemo_aligner_draft.cli.train import main
    from nemo_aligner_draft.algorithms.optimizer_step import OptimizerStep

    windows = []
    original = OptimizerStep.finish

    def recording(self, extra=None):
        before = _snapshot(self.model)
        skipped_before = self.model.nan_skipped_steps
        out = original(self, extra)
        windows.append((self.model.nan_skipped_steps > skipped_before, _equal(before, _snapshot(self.model))))
        return out

    monkeypatch.setattr(OptimizerStep, "finish", recording)
    run = tmp_path / "run"
    steps = 4
    with caplog.at_level(logging.WARNING, logger="nemo_aligner_draft"):
        rc = main(tiny_args(tiny_sd_dir, run, steps, [
            "rm.name=test_nan_guard:poisoned_reward", "+rm.kwargs.nan_calls=[1]", "+rm.kwargs.inf_calls=[3]",
            "+rm.kwargs.inf_grad_calls=[4]", "model.nan_tolerance=3"]))
    assert rc == 0
    skipped = [w for w in windows if w[0]]
    kept = [w for w in windows if not w[0]]
    assert len(windows) == steps + 3 and len(skipped) == 3 and [w[0] for w in windows] == [
        False, True, False, True, True, False, False]
    for _, (same_params, same_opt) in skipped:
        assert same_params and same_opt, "a skipped step changed the weights or the optimizer state"
    for _, (same_params, same_opt) in kept:
        assert not same_params and not same_opt, "finite steps do update (else the check above is vacuous)"
    ckpt = load_ckpt(last_checkpoint(str(run)))
    assert ckpt["global_step"] == steps  # only finite steps count towards max_steps
    assert ckpt["alignment_state"]["nan_skipped_steps"] == 3
    assert ckpt["alignment_state"]["consumed_samples"] == (steps + 3) * 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    history = json.load(open(run / "metrics.json"))["train"]
    assert history[-1]["nan_skipped_steps"] == 3.0
    warnings = [r.getMessage() for r in caplog.records if "optimizer step skipped" in r.getMessage()]
    assert len(warnings) == 3 and "2 in a row" in warnings[2], warnings


def test_consecutive_bad_steps_stop_the_run_with_a_message(tiny_sd_dir, tmp_path, capsys):
    from nemo_aligner_draft.cli.train import EXIT_DIVERGED, main

    run = tmp_path / "run"
    rc = main(tiny_args(tiny_sd_dir, run, 6, [
        "rm.name=test_nan_guard:poisoned_reward", "+rm.kwargs.nan_calls=[1,2,3,4,5]", "model.nan_tolerance=3"]))
    err = capsys.readouterr().err
    assert rc == EXIT_DIVERGED == 3
    assert "training stopped: 3 consecutive steps had a non-finite loss or gradient (model.nan_tolerance=3)" in err
    assert "Traceback" not in err
    ckpt = load_ckpt(last_checkpoint(str(run)))
    assert ckpt["global_step"] == 1 and ckpt["alignment_state"]["consumed_samples"] == 2
    assert not os.path.exists(run / "checkpoints" / "draftp_tiny.nemo")
