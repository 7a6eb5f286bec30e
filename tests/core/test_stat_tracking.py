"""Per-prompt stat tracker against hand-computed means and standard deviations."""
import pytest
import torch

from nemo_aligner_draft.core.stat_tracking import STD_EPS, PerPromptStatTracker, batch_advantages


def _norm(values, pool):
    pool = torch.tensor(pool, dtype=torch.float64)
    return [(v - float(pool.mean())) / (float(pool.std(unbiased=False)) + STD_EPS) for v in values]


def test_per_prompt_statistics_once_min_count_reached():
    tr = PerPromptStatTracker(buffer_size=8, min_count=2)
    prompts = ["cat", "dog", "cat", "dog"]
    r = torch.tensor([1.0, 10.0, 3.0, 30.0])
    adv = tr.update(prompts, r)
    cat = _norm([1.0, 3.0], [1.0, 3.0])
    dog = _norm([10.0, 30.0], [10.0, 30.0])
    torch.testing.assert_close(adv, torch.tensor([cat[0], dog[0], cat[1], dog[1]], dtype=torch.float32))
    assert adv.dtype == r.dtype


def test_fallback_to_batch_statistics_below_min_count():
    tr = PerPromptStatTracker(buffer_size=8, min_count=3)
    prompts = ["cat", "dog", "cat", "dog"]
    r = torch.tensor([1.0, 10.0, 3.0, 30.0])
    adv = tr.update(prompts, r)
    expected = _norm(r.tolist(), r.tolist())
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float32))
    # second batch: cat now has 3 values (>= min_count) and uses its own buffer; "bird" is new
    adv2 = tr.update(["cat", "bird"], torch.tensor([5.0, 7.0]))
    torch.testing.assert_close(adv2[0], torch.tensor(_norm([5.0], [1.0, 3.0, 5.0])[0], dtype=torch.float32))
    torch.testing.assert_close(adv2[1], torch.tensor(_norm([7.0], [5.0, 7.0])[0], dtype=torch.float32))


def test_buffer_keeps_only_the_last_values():
    tr = PerPromptStatTracker(buffer_size=3, min_count=1)
    for v in [100.0, 200.0, 1.0, 2.0]:
        tr.update(["p"], torch.tensor([v]))
    adv = tr.update(["p"], torch.tensor([4.0]))
    # buffer now [1, 2, 4]: the old 100 and 200 have been dropped
    torch.testing.assert_close(adv, torch.tensor(_norm([4.0], [1.0, 2.0, 4.0]), dtype=torch.float32))
    stats = tr.get_stats()["p"]
    assert stats["count"] == 3 and abs(stats["mean"] - 7 / 3) < 1e-12


def test_per_step_prompt_tracking_and_column_fallback():
    tr = PerPromptStatTracker(buffer_size=4, min_count=2)
    prompts = ["a", "a", "b"]
    r = torch.tensor([[1.0, 10.0], [3.0, 20.0], [5.0, 60.0]])
    adv = tr.update(prompts, r)
    assert adv.shape == (3, 2)
    # prompt a has 2 values per step: its own statistics, separately per step
    torch.testing.assert_close(adv[:2, 0], torch.tensor(_norm([1.0, 3.0], [1.0, 3.0]), dtype=torch.float32))
    torch.testing.assert_close(adv[:2, 1], torch.tensor(_norm([10.0, 20.0], [10.0, 20.0]), dtype=torch.float32))
    # prompt b has 1 value: the statistics of the same step's column over the batch
    torch.testing.assert_close(adv[2, 1], torch.tensor(_norm([60.0], [10.0, 20.0, 60.0])[0], dtype=torch.float32))
    assert set(tr.get_stats()) == {"a@0", "a@1", "b@0", "b@1"}


def test_state_dict_round_trip_and_bad_config():
    tr = PerPromptStatTracker(buffer_size=4, min_count=1)
    tr.update(["a", "b"], torch.tensor([1.0, 2.0]))
    tr.update(["a"], torch.tensor([[1.0, 5.0]]))
    tr2 = PerPromptStatTracker(buffer_size=4, min_count=1)
    tr2.load_state_dict(tr.state_dict())
    assert tr2.get_stats() == tr.get_stats()
    x = torch.tensor([3.0])
    torch.testing.assert_close(tr2.update(["a"], x), tr.update(["a"], x))
    with pytest.raises(ValueError, match="prompts"):
        tr.update(["a"], torch.tensor([1.0, 2.0]))
    with pytest.raises(KeyError, match="values"):
        tr2.load_state_dict({"keys": []})


def test_batch_advantages():
    r = torch.tensor([1.0, 2.0, 6.0])
    torch.testing.assert_close(batch_advantages(r), torch.tensor(_norm(r.tolist(), r.tolist()), dtype=torch.float32))
