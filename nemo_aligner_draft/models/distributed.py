"""megatron-core ``parallel_state`` on whatever torch.distributed world Lightning set up.

Lightning's DDP/FSDP strategies initialise the process group; for a single process we create a
one-rank gloo group so megatron-core's data-parallel queries work identically. No CUDA needed:
per-rank randomness comes from seeded generators (see models/base.py), not from
``model_parallel_cuda_manual_seed``.
"""
from __future__ import annotations

import os
from typing import List

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from ..files import atomic_torch_save

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


def data_parallel_group():
    """The process group of this rank's data-parallel replicas: megatron-core's when it is initialised
    (every collective of ours over samples — reward statistics, validation metrics — uses it), else the
    default group (None)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_data_parallel_group()
    return None


def enable_tf32() -> bool:
    """TF32 matmuls and convolutions on Ampere or newer (compute capability ≥ 8), as NeMo-Aligner's
    train_sd_draftp.py sets them; returns whether it did."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def data_parallel_size() -> int:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_data_parallel_world_size()
    return dist.get_world_size() if dist.is_initialized() else 1


class RankDump(Callback):
    """Diagnostics for multi-process runs: ``<dir>/rank<global rank>.pt`` holds this rank's trainable
    parameters at the start and the end of training (whole, gathered when sharded), the elements of the
    network and of a frozen reference it holds (its shards) and in all, the prompts it trained on (in order), its
    data-parallel rank/size and the initial latents ``[micro, C, h, w]`` of its first micro-batch,
    re-drawn through the model's own sampling setup."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.prompts: List[str] = []
        self.initial = {}

    @staticmethod
    def _trainable(pl_module):
        """Whole tensors (a sharded one is gathered: every rank calls this)."""
        out = {}
        for n, p in pl_module.named_parameters():
            if p.requires_grad:
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                out[n] = full.detach().cpu().clone()
        return out

    @staticmethod
    def _held(module):
        """Elements of ``module``'s parameters this rank holds (its shards) and in all; (0, 0) for None."""
        from ..algorithms.optimizer_step import local_shard

        held = total = 0
        for p in module.parameters() if module is not None else ():
            held += local_shard(p).numel()
            total += p.numel()
        return held, total

    def on_train_start(self, trainer, pl_module):
        self.initial = self._trainable(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.prompts.extend(batch["prompt"])

    def on_train_end(self, trainer, pl_module):
        m = pl_module.mcfg.micro_batch_size
        first = self.prompts[:m]
        with torch.no_grad():
            latents = pl_module.sampling_setup(first, 0, "rollout")[2] if first else None
        group = pl_module.dp_group
        from megatron.core import parallel_state

        ref = pl_module.backend.reference_model
        state = {"params": self._trainable(pl_module), "initial_params": self.initial,
                 "net_elements": self._held(pl_module.backend.net),
                 "net_plain_parameters": [n for n, p in pl_module.backend.net.named_parameters()
                                          if not hasattr(p, "to_local")],
                 "frozen_reference_elements": self._held(ref.frozen if ref is not None else None),
                 "dp_group_ranks": dist.get_process_group_ranks(group) if group is not None else None,
                 "dp_group_from_megatron": parallel_state.model_parallel_is_initialized()
                                           and group is parallel_state.get_data_parallel_group(),
                 "prompts": list(self.prompts), "dp_rank": pl_module.dp_rank, "dp_size": pl_module.dp_size,
                 "global_rank": trainer.global_rank, "first_latents": latents, "global_step": trainer.global_step,
                 "consumed_samples": pl_module.consumed_samples}
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt")
        atomic_torch_save(state, path)
