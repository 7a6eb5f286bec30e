"""megatron-core ``parallel_state`` on whatever torch.distributed world Lightning set up.

Lightning's DDP/FSDP strategies initialise the process group; for a single process we create a
one-rank gloo group so megatron-core's data-parallel queries work identically. No CUDA needed:
per-rank randomness comes from seeded generators (see models/base.py), not from
``model_parallel_cuda_manual_seed``.
"""
from __future__ import annotations

import torch.distributed as dist

_OWN_GROUP = False


def initialize() -> None:
    global _OWN_GROUP
    from megatron.core import parallel_state

    if not dist.is_initialized():
        # one rank: an in-process store (megatron-core creates further groups through it)
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        _OWN_GROUP = True
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)


def finalize() -> None:
    global _OWN_GROUP
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if _OWN_GROUP and dist.is_initialized():
        dist.destroy_process_group()
        _OWN_GROUP = False


def data_parallel_rank() -> int:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_data_parallel_rank()
    return dist.get_rank() if dist.is_initialized() else 0


def data_parallel_size() -> int:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_data_parallel_world_size()
    return dist.get_world_size() if dist.is_initialized() else 1
