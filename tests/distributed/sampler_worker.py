"""Run by test_sampler.py under torchrun: one process of a simulated multi-node job writes the prompt
indices its PromptSampler hands out, with dp rank/size taken from megatron-core's parallel_state."""
import json
import os
import sys

import torch.distributed as dist

from nemo_aligner_draft.data.sampler import PromptSampler
from nemo_aligner_draft.models import distributed

if __name__ == "__main__":
    out, num_prompts, micro, rounds = sys.argv[1], *map(int, sys.argv[2:5])
    dist.init_process_group("gloo")
    distributed.initialize()
    rank, size = distributed.data_parallel_rank(), distributed.data_parallel_size()
    sampler = PromptSampler(num_prompts, micro, rank, size, seed=7, consumed_samples=lambda: 0)
    it = iter(sampler)
    batches = [next(it) for _ in range(rounds)]
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"dp_rank": rank, "dp_size": size, "local_rank": int(os.environ["LOCAL_RANK"]),
                   "batches": batches}, f)
    distributed.finalize()
    dist.destroy_process_group()
