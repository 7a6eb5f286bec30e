"""Atomic checkpoint writes: a crash while saving never leaves a truncated checkpoint behind."""
from __future__ import annotations

import os

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_torch_save(obj, path: str) -> None:
    """Write to ``path.tmp-<pid>``, fsync, then rename over ``path`` (atomic on POSIX)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_torch_save(checkpoint, str(path))

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        # Our own checkpoints hold optimizer state and plain Python metadata; never user weights.
        return torch.load(path, map_location=map_location or "cpu", weights_only=False)
