"""Lightning's checkpoint I/O through the package's atomic writes and safe reads (:mod:`..files`), and
the tidying a killed run's checkpoint directory needs before it is resumed."""
from __future__ import annotations

import glob
import os
import re
import shutil
from typing import List

from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..files import TMP_MARK, allow_checkpoint_globals, atomic_torch_save, safe_torch_load


def safe_load_checkpoint(path, map_location="cpu"):
    return safe_torch_load(path, map_location=map_location, what="checkpoint")


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

    * ``*.tmp-<pid>`` files (or shard directories) of processes that no longer run are half-written
      checkpoints: removed.
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
            try:
                if os.path.isdir(tmp):  # a sharded checkpoint's scratch directory (models/fsdp.py)
                    shutil.rmtree(tmp)
                else:
                    os.unlink(tmp)
            except FileNotFoundError:  # every rank tidies: another one was first
                continue
            changed.append(tmp)
    # a checkpoint is a file, or a directory of shards (trainer.strategy=fsdp)
    lasts = [p for p in glob.glob(os.path.join(directory, "*last.ckpt"))
             if not os.path.exists(_unfinished_marker(p)) and os.path.exists(p)]
    if len(lasts) > 1:
        lasts.sort(key=lambda p: (_step_of(p), os.path.getmtime(p)))
        for old in lasts[:-1]:
            try:
                os.replace(old, old + ".stale")
            except FileNotFoundError:  # another rank set it aside first
                continue
            changed.append(old)
    return changed


class AtomicCheckpointIO(TorchCheckpointIO):
    def __init__(self):
        super().__init__()
        allow_checkpoint_globals()

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_torch_save(checkpoint, str(path))

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return safe_load_checkpoint(path, map_location=map_location or "cpu")
