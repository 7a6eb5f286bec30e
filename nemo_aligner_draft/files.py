"""Writing and reading files safely, once for the whole package.

Writes are atomic: the content goes to ``<path>.tmp-<pid>`` in the same directory, is fsynced and
renamed over ``path``, so a crash (or SIGKILL) never leaves a truncated file under the final name and a
reader sees the old file or the new one. NeMo's resume looks for ``*last.ckpt``, so a leftover
temporary never matches it.

Reads of user-supplied tensors go through :func:`safe_torch_load`: ``torch.load(weights_only=True)``
with one allow-list — the OmegaConf containers a Lightning checkpoint's ``hyper_parameters`` hold (NeMo's
ModelPT writes them), nothing that can run code on unpickling.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import typing
from typing import Iterator

TMP_MARK = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str, keep_extension: bool = False) -> Iterator[str]:
    """``with atomic_path(p) as tmp:`` write ``tmp``; on success it replaces ``p``, on error it is removed.

    The temporary is ``<p>.tmp-<pid>``: no glob for ``*.ckpt`` or ``*last.ckpt`` matches it, and a
    process id at the end tells a leftover of a dead process (:mod:`..models.checkpoint_io`). Writers
    that choose the format from the extension (PIL, matplotlib) get ``<root>.tmp-<pid><ext>``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}{TMP_MARK}{os.getpid()}{ext}" if keep_extension else f"{path}{TMP_MARK}{os.getpid()}"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def atomic_write_json(path: str, obj, **dump_kwargs) -> None:
    dump_kwargs.setdefault("indent", 1)
    atomic_write_text(path, json.dumps(obj, **dump_kwargs) + "\n")


def atomic_torch_save(obj, path: str) -> None:
    import torch

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)


def atomic_save_figure(fig, path: str, **savefig_kwargs) -> None:
    with atomic_path(path, keep_extension=True) as tmp:
        fig.savefig(tmp, **savefig_kwargs)


def atomic_save_image(image, path: str) -> None:
    """A PIL image, written atomically."""
    with atomic_path(path, keep_extension=True) as tmp:
        image.save(tmp)


# --------------------------------------------------------------------------- safe reads
def checkpoint_safe_globals() -> list:
    """The non-tensor classes a checkpoint of ours (or of NeMo's ModelPT) holds: OmegaConf containers,
    their nodes and metadata, and plain containers. ModelPT saves its cfg with
    ``save_hyperparameters("cfg")``, so a NeMo / NeMo-Aligner Lightning ``.ckpt`` carries an OmegaConf
    DictConfig in ``hyper_parameters``; OmegaConf keeps ``pathlib.Path`` values as such (PathNode), which
    unpickle as ``pathlib.PosixPath`` / ``WindowsPath`` — plain data, built from their string parts."""
    import pathlib

    from omegaconf import DictConfig, ListConfig, nodes
    from omegaconf.base import ContainerMetadata, Metadata

    value_nodes = [getattr(nodes, n) for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode",
                                              "BytesNode", "PathNode") if hasattr(nodes, n)]
    return [DictConfig, ListConfig, ContainerMetadata, Metadata, typing.Any, collections.defaultdict, dict, list,
            int, float, str, bool, *value_nodes, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
            pathlib.PureWindowsPath]


def allow_checkpoint_globals() -> None:
    """Register the allow-list process-wide. Registered rather than scoped with ``torch.serialization.
    safe_globals``: NeMo's EMA callback reads ``*-EMA.ckpt`` with a plain ``torch.load`` (weights_only by
    default since torch 2.6) and leaving a scoped context would remove the classes it needs."""
    import torch

    torch.serialization.add_safe_globals(checkpoint_safe_globals())


def load_state_dict_file(path: str, what: str) -> dict:
    """A tensor state dict from a user's weights file (``torch.load(weights_only=True)``, or safetensors),
    unwrapped from a ``"state_dict"`` entry; a file that is not one is a ValueError naming ``what``."""
    import torch

    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses pickled objects: say so with the path
            raise ValueError(f"{what}: cannot load {path!r} as a tensor-only state dict "
                             f"(torch.load weights_only=True): {e}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{what}: {path!r} holds no state dict (got {type(state).__name__})")
    return state


def safe_torch_load(path, map_location="cpu", what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)`` with the allow-list. A missing, truncated or unsafe file is
    an :class:`~.errors.InputError` whose key is the path."""
    import torch

    from .errors import InputError

    allow_checkpoint_globals()
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise InputError(str(path), f"{what} does not exist") from None
    except IsADirectoryError:
        raise InputError(str(path), f"is a directory, expected a {what} file") from None
    except Exception as e:  # truncated file, foreign pickle, classes outside the allow-list
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # torch's refusal is several paragraphs; the line naming the forbidden global is the useful one
        named = [line for line in lines if "unsupported global" in line.lower() or "WeightsUnpickler error" in line]
        detail = (named or lines or [type(e).__name__])[-1][:400]
        raise InputError(str(path), f"{what} cannot be loaded safely (weights_only=True): {detail}") from e
