"""Prompt sources: one entry point, :func:`open_prompt_source`, for every kind of prompt input.

``open_prompt_source(path_or_spec, key, max_chars)`` returns a :class:`PromptSource`:

* ``builtin:<name>``, a ``.txt`` or a ``.jsonl`` file → :class:`ListPromptSource`, the prompts of
  :func:`~.prompts.load_prompts` held in memory (a ``list`` subclass: everything that took a list of
  prompts still does).
* a webdataset shard ``prompts.tar``, a directory of ``*.tar`` shards, a brace pattern
  (``shards/prompts-{000..009}.tar``, webdataset's ``::`` joins several), or a glob
  (``shards/*.tar``) → :class:`~.webdataset_source.WebdatasetPromptSource`, which streams the ``txt``
  member of each sample (NeMo-Aligner's ``{"__key__": "sample%06d", "txt": prompt}`` layout written with
  ``webdataset.TarWriter``) and holds only an index of the shards in memory.

Bad input raises :class:`~..errors.InputError` of ``key`` (the config key that named the path), before
anything is created: every prompt is read and checked when the source is opened.

The interface (what :meth:`~..models.base.AlignmentModel.train_dataloader` and ``val_dataloader`` use):

``len(source)``
    prompts in one epoch (a pass over the data set); ``trainer.<algo>.max_epochs`` caps the steps by it.
``source[i]``, ``source[a:b]``, ``iter(source)``
    prompts in the source's own (file) order; a slice is a ``list`` of ``str``.
``source.dataloader(micro_batch_size, dp_rank, dp_size, seed, consumed_samples, length=2**62, shuffle=True, num_workers=0)``
    the training stream of this data-parallel rank: an endless ``DataLoader`` of batches
    ``{"prompt": [str] * micro_batch_size, "index": [int] * micro_batch_size}`` (``index``: the prompt's
    position in the source's order). The contract is :class:`~.sampler.PromptSampler`'s: a *round*
    gives ``micro_batch_size`` consecutive prompts of the epoch's order to each of ``dp_size`` ranks, so
    global sample ``round × micro × dp + rank × micro + i`` is item ``i`` of rank ``rank``'s batch in
    round ``round``; the incomplete last round of an epoch is dropped (no prompt twice in an epoch on
    any rank); epoch ``e``'s order is a shuffle drawn from ``(seed, e)`` (or the file order when
    ``shuffle`` is off), and epochs repeat for as long as the run draws. ``consumed_samples`` (a
    callable, read when iteration starts) is where the stream starts: a run resumed at ``N`` consumed
    samples gets exactly what an uninterrupted run got from ``N`` on, on every rank. The order does
    not depend on ``num_workers``. ``length`` is what ``len()`` of the loader reports (progress bars).
"""
from __future__ import annotations

import glob
import os
import tarfile
from typing import Callable, Iterable, List

from ..errors import InputError
from .interface import PromptSource
from .prompts import PromptDataset, collate_prompts, load_prompts
from .sampler import PromptSampler


class ListPromptSource(list, PromptSource):
    """Prompts held in memory (``.txt``, ``.jsonl``, ``builtin:``): a list, plus the training stream of
    :class:`~.sampler.PromptSampler` over it — exactly what ``train_dataloader`` built before sources."""

    def __init__(self, prompts: Iterable[str] = (), description: str = "prompts"):
        super().__init__(prompts)
        self.description = description

    def dataloader(self, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                   consumed_samples: Callable[[], int], length: int = 2**62, shuffle: bool = True,
                   num_workers: int = 0):
        import torch

        ds = PromptDataset(self)
        sampler = PromptSampler(len(ds), micro_batch_size, dp_rank, dp_size, seed, consumed_samples=consumed_samples,
                                shuffle=shuffle, length=length)
        return torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_prompts,
                                           num_workers=num_workers)


def as_prompt_source(prompts) -> PromptSource:
    """``prompts`` if it is a :class:`PromptSource` already, else a list of prompts wrapped as one."""
    if isinstance(prompts, PromptSource):
        return prompts
    if prompts is None:
        raise ValueError("no training prompts: the model was built without train_prompts")
    return ListPromptSource(prompts)


_PATTERN_CHARS = ("{", "::", "*", "?", "[")


def is_webdataset_spec(path: str) -> bool:
    """Whether ``path`` names webdataset shards (a ``.tar``, a directory, a brace/glob pattern, or a file
    that is a tar archive whatever its name) rather than a prompt file or ``builtin:`` set."""
    if path.startswith("builtin:"):
        return False
    if os.path.isdir(path) or path.lower().endswith(".tar"):
        return True
    if path.lower().endswith((".txt", ".jsonl")):
        return False
    if not os.path.exists(path) and any(c in path for c in _PATTERN_CHARS):
        return True
    if os.path.isfile(path):
        try:
            return tarfile.is_tarfile(path)
        except OSError:
            return False
    return False


def expand_shards(spec: str, key: str) -> List[str]:
    """The shard files ``spec`` names, in order: a file; a directory's ``*.tar`` (sorted); webdataset's
    brace expansion (``{000..009}``, ``{a,b}``) and ``::`` joins; a glob (sorted)."""
    if os.path.isdir(spec):
        shards = sorted(os.path.join(spec, f) for f in os.listdir(spec)
                        if f.lower().endswith(".tar") and os.path.isfile(os.path.join(spec, f)))
        if not shards:
            raise InputError(key, f"{spec!r} is a directory with no .tar shards in it (expected a prompt file "
                                  f"(.txt or .jsonl), a webdataset .tar shard or a directory of .tar shards)")
        return shards
    if os.path.exists(spec):
        return [spec]
    if "{" in spec or "::" in spec:
        from webdataset.shardlists import expand_urls

        try:
            names = list(expand_urls(spec))
        except Exception as e:  # braceexpand's own errors: an unbalanced brace and the like
            raise InputError(key, f"cannot expand the shard pattern {spec!r}: {e}") from e
    else:
        names = [spec]
    shards: List[str] = []
    missing: List[str] = []
    for name in names:
        if os.path.isfile(name):
            shards.append(name)
        elif any(c in name for c in "*?["):
            found = sorted(f for f in glob.glob(name) if os.path.isfile(f))
            if not found:
                missing.append(name)
            shards.extend(found)
        else:
            missing.append(name)
    if names == [spec] and missing:
        what = "no webdataset shard matches" if any(c in spec for c in "*?[") else "webdataset shard"
        raise InputError(key, f"{what} {spec!r}" + ("" if what.startswith("no ") else " does not exist"))
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InputError(key, f"{len(missing)} of the {len(names)} webdataset shard(s) of {spec!r} do not exist: {shown}")
    return shards


def open_prompt_source(path_or_spec: str, key: str = "model.data.train.dataset_path",
                       max_chars: int = 1000) -> PromptSource:
    """Open the prompts ``path_or_spec`` names (see the module docstring); bad input raises
    :class:`InputError` of ``key``."""
    path = str(path_or_spec)
    if not is_webdataset_spec(path):
        return ListPromptSource(load_prompts(path, key, max_chars), description=path)
    from .webdataset_source import WebdatasetPromptSource

    return WebdatasetPromptSource(expand_shards(path, key), key=key, max_chars=max_chars, description=path)
