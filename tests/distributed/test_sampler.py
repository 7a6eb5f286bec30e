"""PromptSampler: disjoint across ranks within an epoch, exact resume, and dp size from the world
(simulated 2 nodes × 1 process under torchrun, where every process has LOCAL_RANK 0)."""
import json
import os
import socket
import subprocess

import pytest

from distributed_helpers import REPO, VENV_BIN, child_env
from nemo_aligner_draft.data.sampler import PromptSampler


def _samplers(n, micro, dp, consumed=0, seed=3):
    return [PromptSampler(n, micro, r, dp, seed, consumed_samples=lambda: consumed) for r in range(dp)]


def _take(sampler, k):
    it = iter(sampler)
    return [next(it) for _ in range(k)]


@pytest.mark.parametrize("n,micro,dp", [(20, 3, 2), (12, 2, 2), (17, 1, 4), (9, 2, 1)])
def test_no_prompt_twice_within_an_epoch_across_ranks(n, micro, dp):
    samplers = _samplers(n, micro, dp)
    rounds = samplers[0].rounds_per_epoch
    assert rounds == n // (micro * dp)
    for epoch in range(3):
        seen = []
        for r in range(epoch * rounds, (epoch + 1) * rounds):
            for s in samplers:
                seen += s.indices_for_round(r)
        assert len(seen) == len(set(seen)) == rounds * micro * dp, f"epoch {epoch}: repeats"
        assert all(0 <= i < n for i in seen)
    # epochs are reshuffled, not repeated in the same order
    first = [i for s in samplers for i in s.indices_for_round(0)]
    second = [i for s in samplers for i in s.indices_for_round(rounds)]
    assert first != second


@pytest.mark.parametrize("k_rounds", [0, 1, 3, 7, 10])
def test_resume_at_consumed_samples_continues_exactly(k_rounds):
    n, micro, dp = 20, 3, 2  # 3 rounds per epoch: k crosses epoch boundaries
    uninterrupted = [_take(s, 12) for s in _samplers(n, micro, dp)]
    resumed = [_take(s, 12 - k_rounds) for s in _samplers(n, micro, dp, consumed=k_rounds * micro * dp)]
    for rank in range(dp):
        assert resumed[rank] == uninterrupted[rank][k_rounds:]


def test_resume_rejects_consumed_samples_off_the_round_grid():
    (s, _) = _samplers(20, 3, 2, consumed=5)
    with pytest.raises(ValueError, match="round size 6"):
        next(iter(s))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_one_process_each(tmp_path):
    """dp size comes from the world (2), not from devices per node (1): the two 'nodes' share the
    epoch without overlap, exactly like one process per rank of a 2-rank sampler."""
    port, n, micro, rounds = _free_port(), 8, 2, 4  # 2 rounds per epoch
    procs = []
    for node in range(2):
        cmd = [os.path.join(VENV_BIN, "torchrun"), "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
               "--master_addr=127.0.0.1", f"--master_port={port}",
               os.path.join(REPO, "tests", "distributed", "sampler_worker.py"), str(tmp_path), str(n), str(micro),
               str(rounds)]
        procs.append(subprocess.Popen(cmd, env=child_env(str(tmp_path)), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    got = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert [g["local_rank"] for g in got] == [0, 0]
    assert [(g["dp_rank"], g["dp_size"]) for g in got] == [(0, 2), (1, 2)]
    reference = [PromptSampler(n, micro, r, 2, seed=7, consumed_samples=lambda: 0) for r in range(2)]
    for r in range(2):
        assert got[r]["batches"] == _take(reference[r], rounds)
    for e in range(2):
        epoch = [i for g in got for b in g["batches"][2 * e:2 * e + 2] for i in b]
        assert sorted(epoch) == list(range(n)), f"epoch {e} is not a permutation of the prompts"
