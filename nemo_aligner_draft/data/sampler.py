"""A resumable, data-parallel-aware prompt sampler keyed on consumed samples.

The stream of prompts is a pure function of (seed, consumed samples): epoch e is a permutation of
the data set drawn from ``seed + e``; each *round* hands ``micro_batch_size`` consecutive prompts to
each of the ``dp_size`` data-parallel ranks, so a round consumes ``micro_batch_size × dp_size``
prompts. An incomplete last round of an epoch is dropped, so no prompt is seen twice within an epoch
on any rank. Resuming at consumed samples k continues exactly where the run stopped. The sampler is
infinite; the trainer stops on ``max_steps``.
"""
from __future__ import annotations

from typing import Callable, Iterator, List

import torch



def check_round(num_prompts: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
    """One round (a micro-batch on every data-parallel rank) must fit in the prompts; ``dp_rank`` must
    be one of the ranks."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
    if num_prompts < micro_batch_size * dp_size:
        raise ValueError(f"{num_prompts} prompts cannot fill one round of micro_batch_size × data-parallel "
                         f"size = {micro_batch_size} × {dp_size}")

class PromptSampler:
    def __init__(self, num_prompts: int, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 consumed_samples: Callable[[], int], shuffle: bool = True, length: int = 2**62):
        check_round(num_prompts, micro_batch_size, dp_rank, dp_size)
        self.num_prompts = num_prompts
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.consumed_samples = consumed_samples  # read when iteration (re)starts
        self.length = length  # micro-batches the run will draw (for progress bars); the stream itself is endless

    @property
    def round_size(self) -> int:
        return self.micro_batch_size * self.dp_size

    @property
    def rounds_per_epoch(self) -> int:
        return self.num_prompts // self.round_size

    def _order(self, epoch: int) -> List[int]:
        if not self.shuffle:
            return list(range(self.num_prompts))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_prompts, generator=g).tolist()

    def indices_for_round(self, r: int) -> List[int]:
        epoch, within = divmod(r, self.rounds_per_epoch)
        start = within * self.round_size + self.dp_rank * self.micro_batch_size
        return self._order(epoch)[start:start + self.micro_batch_size]

    def __iter__(self) -> Iterator[List[int]]:
        consumed = int(self.consumed_samples())
        if consumed % self.round_size:
            raise ValueError(f"consumed samples {consumed} is not a multiple of the round size {self.round_size}")
        r = consumed // self.round_size
        while True:
            yield self.indices_for_round(r)
            r += 1

    def __len__(self) -> int:
        return self.length
