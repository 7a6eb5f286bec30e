"""Training metrics under gradient accumulation describe the whole optimizer step, not its last micro-batch."""
import torch

from nemo_aligner_draft.algorithms.optimizer_step import window_mean


def test_window_mean_pools_reward_statistics_over_micro_batches():
    g = torch.Generator().manual_seed(0)
    micro = [torch.randn(8, generator=g) * s + m for s, m in ((1.0, 80.0), (3.0, 70.0), (0.5, 90.0), (2.0, 75.0))]
    window = [{"reward_mean": r.mean(), "reward_std": r.std(unbiased=False), "loss": -r.mean(),
               "kl_penalty": torch.tensor(float(i))} for i, r in enumerate(micro)]
    out = window_mean(window)
    every = torch.cat(micro)
    torch.testing.assert_close(out["reward_mean"], every.mean())
    torch.testing.assert_close(out["reward_std"], every.std(unbiased=False))
    torch.testing.assert_close(out["loss"], -every.mean())
    torch.testing.assert_close(out["kl_penalty"], torch.tensor(1.5))


def test_single_micro_batch_window_is_unchanged():
    m = {"reward_mean": torch.tensor(3.0), "reward_std": torch.tensor(0.5), "loss": torch.tensor(-3.0)}
    out = window_mean([m])
    for k in m:
        torch.testing.assert_close(out[k], m[k])
