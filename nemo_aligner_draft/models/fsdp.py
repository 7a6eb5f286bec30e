"""FSDP that shards: FSDP2 (``torch.distributed.fsdp.fully_shard``) by network block, under Lightning's
``ModelParallelStrategy`` (which, unlike Lightning 2.4's ``FSDPStrategy``, runs on CPU with gloo too).

What is sharded (``trainer.strategy=fsdp``):

* the trained network (UNet): every block of :data:`BLOCK_CLASSES` (transformer blocks, ResNet
  blocks), then every down/mid/up stage (their samplers and projections), then the root (stem, time
  embedding, output head) — :func:`shard_plan`. Each unit is all-gathered just before its forward and
  resharded after it, so a rank holds 1/world of the weights, gradients and optimizer state plus the
  one unit in use;
* the full-fine-tune reference (the frozen copy) with the same plan. The LoRA reference is the policy
  with its adapters off: the same sharded modules, nothing extra;
* not the frozen VAE, text encoders and reward model: they are replicated (no gradients, no optimizer
  state) — sharding them would add one all-gather per call for memory a single GPU already holds.

Checkpoints (:class:`ShardedStrategy`) are sharded too: a directory (named like the file Lightning asks
for) holding ``torch.distributed.checkpoint`` shards of the trainable weights and the optimizer state —
each rank writes its own shard — and ``meta.pt`` with everything else (loops, RNG, consumed samples),
written to ``<name>.tmp-<pid>`` first and renamed into place by rank 0 once every rank has written.
Resume reads it back into the sharded modules, weights-only for ``meta.pt``.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..files import TMP_MARK, atomic_torch_save, safe_torch_load

#: network blocks sharded as one unit each (diffusers' UNet blocks; SD and SDXL alike)
BLOCK_CLASSES = ("BasicTransformerBlock", "ResnetBlock2D")
#: attributes of the network whose modules (or module lists' items) are one unit each, after the blocks
STAGE_ATTRIBUTES = ("down_blocks", "mid_block", "up_blocks")
META = "meta.pt"


def shard_plan(net: torch.nn.Module, block_classes=BLOCK_CLASSES) -> List[str]:
    """Qualified names of the modules to shard, in the order ``fully_shard`` must see them (inner units
    first; ``""`` — the root — last). Every parameter belongs to exactly one unit: the innermost planned
    module that contains it."""
    blocks = [n for n, m in net.named_modules() if type(m).__name__ in block_classes and n]
    stages = []
    for attr in STAGE_ATTRIBUTES:
        child = getattr(net, attr, None)
        if isinstance(child, torch.nn.ModuleList):
            stages += [f"{attr}.{i}" for i in range(len(child))]
        elif isinstance(child, torch.nn.Module):
            stages.append(attr)
    # a stage that is itself a block (none in diffusers' UNets) is planned once
    return blocks + [s for s in stages if s not in blocks] + [""]


def unit_of(plan: List[str], param_name: str) -> str:
    """The planned unit a parameter belongs to (the longest planned prefix of its name)."""
    best = ""
    for unit in plan:
        if unit and (param_name == unit or param_name.startswith(unit + ".")) and len(unit) > len(best):
            best = unit
    return best


def shard_network(net: torch.nn.Module, mesh, block_classes=BLOCK_CLASSES) -> List[str]:
    """Apply ``fully_shard`` to ``net`` by :func:`shard_plan` over ``mesh``; returns the plan."""
    from torch.distributed.fsdp import fully_shard

    plan = shard_plan(net, block_classes)
    for name in plan:
        fully_shard(net.get_submodule(name) if name else net, mesh=mesh)
    return plan


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def reshard_all(module: torch.nn.Module) -> None:
    """Free every gathered unit of ``module`` (local, no collective). After a backward pass: a unit whose
    forward inputs carry no gradient (the blocks before the first adapter) and that was recomputed in
    backward (sampler or activation checkpointing) gets no post-backward hook of its own, and FSDP leaves it
    gathered until its next forward."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_state_dict(module: torch.nn.Module) -> Dict[str, Optional[torch.Tensor]]:
    """``module.state_dict()`` with every sharded tensor gathered whole (a collective: every rank calls
    it). Rank 0 gets the tensors, on CPU; the other ranks get None in their place (the export and the
    ``.nemo`` archive are written by rank 0). Unsharded tensors are returned as they are."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    out: Dict[str, Optional[torch.Tensor]] = {}
    for k, v in module.state_dict().items():
        if isinstance(v, DTensor):
            full = v.full_tensor()
            out[k] = full.cpu() if rank0 else None
            del full
        else:
            out[k] = v
    return out


def _strategy_base():
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy


def make_strategy(world: int, process_group_backend: str):
    """The strategy for ``trainer.strategy=fsdp`` on ``world`` processes."""
    return ShardedStrategy(data_parallel_size=world, tensor_parallel_size=1,
                           process_group_backend=process_group_backend)


class ShardedStrategy(_strategy_base()):
    """Lightning's ``ModelParallelStrategy`` (FSDP2, one data-parallel mesh dimension) with this package's
    checkpoints: only the trainable weights (sharded), the optimizer state (sharded), and ``meta.pt``."""

    def _trainable(self) -> Dict[str, torch.Tensor]:
        return {n: p for n, p in self.lightning_module.named_parameters() if p.requires_grad}

    def lightning_module_state_dict(self) -> Dict[str, Any]:
        return {n: p.detach() for n, p in self._trainable().items()}

    def optimizer_state(self, optimizer) -> Dict[str, Any]:
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        return get_optimizer_state_dict(self.lightning_module, optimizer)

    def save_checkpoint(self, checkpoint: Dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        path = Path(self.broadcast(str(filepath)))
        tmp = Path(self.broadcast(f"{path}{TMP_MARK}{os.getpid()}"))  # rank 0's pid names the scratch dir
        if self.global_rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        self.barrier()
        shards = {"state_dict": checkpoint.pop("state_dict")}
        for i, state in enumerate(checkpoint.pop("optimizer_states", [])):
            shards[f"optimizer_{i}"] = state
        dcp.save(shards, checkpoint_id=str(tmp), process_group=None if not dist.is_initialized() else dist.group.WORLD)
        if self.global_rank == 0:
            atomic_torch_save(checkpoint, str(tmp / META))
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            os.replace(tmp, path)
        self.barrier()

    def remove_checkpoint(self, filepath) -> None:
        if self.global_rank == 0:
            p = Path(filepath)
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    def load_checkpoint(self, checkpoint_path) -> Dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        from ..errors import InputError

        path = Path(self.broadcast(str(checkpoint_path)))
        if not (path / META).is_file():
            raise InputError(str(path), f"not a sharded checkpoint of trainer.strategy=fsdp (no {META} in it)")
        meta = safe_torch_load(str(path / META), what="checkpoint metadata")
        weights = {n: p.detach() for n, p in self._trainable().items()}  # loaded in place, shard by shard
        dcp.load({"state_dict": weights}, checkpoint_id=str(path))
        for i, opt in enumerate(self.optimizers):
            state = {f"optimizer_{i}": get_optimizer_state_dict(self.lightning_module, opt)}
            dcp.load(state, checkpoint_id=str(path))
            set_optimizer_state_dict(self.lightning_module, opt, optim_state_dict=state[f"optimizer_{i}"])
        meta["state_dict"] = weights  # what on_load_checkpoint checks against the model
        return meta

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        pass  # loaded in load_checkpoint

    def load_optimizer_state_dict(self, checkpoint) -> None:
        pass  # loaded in load_checkpoint
