"""The interface every prompt source implements (described in :mod:`.source`, which opens them)."""
from __future__ import annotations

from typing import Callable


class PromptSource:
    """What a prompt source offers (documented in :mod:`.source`): ``len``, the source's own order by
    ``[i]``, ``[a:b]`` and iteration, and the training stream of one data-parallel rank."""

    description: str = "prompts"

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i):
        raise NotImplementedError

    def __iter__(self):
        raise NotImplementedError

    def dataloader(self, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                   consumed_samples: Callable[[], int], length: int = 2**62, shuffle: bool = True,
                   num_workers: int = 0):
        raise NotImplementedError
