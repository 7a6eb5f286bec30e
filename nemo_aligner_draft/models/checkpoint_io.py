"""Atomic checkpoint writes and safe reads.

Writes: a crash (or SIGKILL) while saving never leaves a truncated checkpoint under the final name;
the file is written to ``<name>.tmp-<pid>``, fsynced and renamed. NeMo's resume looks for
``*last.ckpt``, so a leftover temporary never matches it; :func:`tidy_checkpoint_dir` removes such
leftovers (and stale duplicate ``*last.ckpt`` files) before a resumed run looks for its checkpoint.

Reads: ``torch.load(weights_only=True)``. A Lightning checkpoint also holds the model's
``hyper_parameters`` as OmegaConf containers; those plain-data classes are allow-listed, nothing
that can run code on unpickling is.
"""
from __future__ import annotations

import collections
import glob
import os
import re
import typing
from typing import List

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..errors import InputError

TMP_MARK = ".tmp-"


def atomic_torch_save(obj, path: str) -> None:
    """Write to ``path.tmp-<pid>``, fsync, then rename over ``path`` (atomic on POSIX)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}{TMP_MARK}{os.getpid()}"
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


def checkpoint_safe_globals() -> list:
    """The non-tensor classes a checkpoint of ours contains: OmegaConf containers and their nodes."""
    from omegaconf import DictConfig, ListConfig, nodes
    from omegaconf.base import ContainerMetadata, Metadata

    return [DictConfig, ListConfig, ContainerMetadata, Metadata, typing.Any, collections.defaultdict, dict, list,
            int, float, str, bool, nodes.AnyNode, nodes.StringNode, nodes.IntegerNode, nodes.FloatNode,
            nodes.BooleanNode]


def safe_load_checkpoint(path, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with the OmegaConf allow-list; errors name the path."""
    # Registered process-wide rather than with the safe_globals context manager: leaving that context
    # removes the listed classes again, including the registration NeMo's EMA callback relies on.
    allow_checkpoint_globals()
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise InputError(str(path), "checkpoint does not exist") from None
    except Exception as e:  # truncated file, foreign pickle, classes outside the allow-list
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # torch's refusal is several paragraphs; the line naming the forbidden global is the useful one
        named = [line for line in lines if "unsupported global" in line.lower() or "WeightsUnpickler error" in line]
        detail = (named or lines or [type(e).__name__])[-1][:400]
        raise InputError(str(path), f"checkpoint cannot be loaded safely (weights_only=True): {detail}") from e


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _step_of(path: str) -> int:
    m = re.search(r"step=(\d+)", os.path.basename(path))
    return int(m.group(1)) if m else -1


def _unfinished_marker(path: str) -> str:
    # NeMoModelCheckpoint marks a checkpoint being written or deleted as <name without .ckpt>-unfinished
    return path.removesuffix(".ckpt").removesuffix("-EMA") + "-unfinished"


def tidy_checkpoint_dir(directory: str) -> List[str]:
    """Make a killed run's checkpoint directory resumable; return what was moved or removed.

    * ``*.tmp-<pid>`` files of processes that no longer run are half-written checkpoints: removed.
    * More than one complete ``*last.ckpt`` happens when a run dies between writing the new last
      checkpoint and deleting the previous one; NeMo's resume then refuses to choose. The newest
      (highest ``step=``, then modification time) stays; older ones are renamed to ``*.stale``.
    """
    changed: List[str] = []
    if not os.path.isdir(directory):
        return changed
    for tmp in glob.glob(os.path.join(directory, f"*{TMP_MARK}*")):
        suffix = tmp.rsplit(TMP_MARK, 1)[1]
        if suffix.isdigit() and not _pid_alive(int(suffix)):
            os.unlink(tmp)
            changed.append(tmp)
    lasts = [p for p in glob.glob(os.path.join(directory, "*last.ckpt"))
             if not os.path.exists(_unfinished_marker(p)) and os.path.isfile(p)]
    if len(lasts) > 1:
        lasts.sort(key=lambda p: (_step_of(p), os.path.getmtime(p)))
        for old in lasts[:-1]:
            os.replace(old, old + ".stale")
            changed.append(old)
    return changed


def allow_checkpoint_globals() -> None:
    """Register the allow-list process-wide: NeMo's EMA callback reads ``*-EMA.ckpt`` with a plain
    ``torch.load`` (weights_only=True by default since torch 2.6), which otherwise refuses our
    checkpoints' OmegaConf ``hyper_parameters`` and breaks every resume with EMA enabled."""
    torch.serialization.add_safe_globals(checkpoint_safe_globals())


class AtomicCheckpointIO(TorchCheckpointIO):
    def __init__(self):
        super().__init__()
        allow_checkpoint_globals()

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_torch_save(checkpoint, str(path))

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return safe_load_checkpoint(path, map_location=map_location or "cpu")
