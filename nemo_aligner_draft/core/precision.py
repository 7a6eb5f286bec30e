"""Precision helpers shared by the backends and the rewards."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def autocast_off() -> Iterator[None]:
    """Run the block without autocast, on both device types: a module on CPU can run inside a CUDA
    autocast region and vice versa. What runs inside computes in its own parameters' dtype."""
    with torch.autocast(device_type="cpu", enabled=False):
        if torch.cuda.is_available():
            with torch.autocast(device_type="cuda", enabled=False):
                yield
        else:
            yield
