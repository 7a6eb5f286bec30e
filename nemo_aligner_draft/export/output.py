"""How every converter writes: into a temporary sibling of the output, renamed into place only when
the whole output is complete, so a failure (or an existing output) leaves nothing behind or changed."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Dict

import torch

from ..errors import InputError


@contextmanager
def atomic_output(path: str, is_dir: bool):
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds."""
    path = os.path.abspath(path)
    if os.path.exists(path) and (not is_dir or os.listdir(path)):
        raise InputError("out", f"{path!r} already exists; remove it or choose another path")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    # same directory as the output: os.replace is then a rename on one file system
    tmp_dir = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    tmp = tmp_dir if is_dir else os.path.join(tmp_dir, os.path.basename(path))
    try:
        yield tmp
        if is_dir and os.path.isdir(path):
            os.rmdir(path)  # empty (checked above)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def write_nemo_tar(tar_path: str, config: dict, weights: Dict[str, torch.Tensor]) -> None:
    """A ``.nemo`` file as NeMo's ``SaveRestoreConnector`` packs one: an uncompressed tar of ``./``
    holding ``model_config.yaml`` and ``model_weights.ckpt`` (a ``torch.save``d state dict)."""
    import tarfile

    import yaml

    with tempfile.TemporaryDirectory() as work:
        with open(os.path.join(work, "model_config.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        torch.save(weights, os.path.join(work, "model_weights.ckpt"))
        with tarfile.open(tar_path, "w:") as tar:
            tar.add(work, arcname=".")


def write_pipeline(base: str, out_dir: str, replaced: Dict[str, torch.nn.Module]) -> str:
    """The diffusers pipeline directory ``base`` copied to ``out_dir``, with each component of
    ``replaced`` (subfolder → diffusers model) saved in place of the original."""
    with atomic_output(out_dir, is_dir=True) as tmp:
        shutil.copytree(base, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*replaced))
        for subfolder, model in replaced.items():
            model.save_pretrained(os.path.join(tmp, subfolder), safe_serialization=True)
    return out_dir
