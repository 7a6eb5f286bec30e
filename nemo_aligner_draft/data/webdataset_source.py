"""Prompts streamed from webdataset tar shards (NeMo-Aligner's DRaFT+ training data).

A sample is the group of consecutive tar members that share a key (webdataset's ``group_by_keys``:
``sample000042.txt``, ``sample000042.json`` … → ``{"__key__": "sample000042", "txt": b"…", …}``); its
prompt is the ``txt`` member, UTF-8, stripped. Samples without a ``txt`` member are skipped (they are
not prompts); a shard with none is an error.

**Opening** scans every shard once, in order — a walk over the raw tar headers that reads only the
``txt`` members (``tarfile`` reads any shard the walk leaves to it: global pax headers, sparse or
damaged files) — and groups members into samples as webdataset does. That pass checks every prompt
(UTF-8, not empty, at most ``max_chars``), counts them — ``len(source)``, the length of one epoch,
known before training — and records an index of *blocks*: runs of ``block_size`` consecutive prompts
of one shard, each by the byte offset of its first sample. Only that index stays in memory (one entry
per ``block_size`` prompts), never the prompts. Shards are local, uncompressed ``.tar`` files; one
rewritten after it was opened is an error when it is next read (size and modification time).

**Reading** a block seeks to its offset and parses from there with webdataset's own
``tar_file_iterator`` and ``group_by_keys``.

**Epoch order.** The source's own order (shards in order, samples in file order) numbers the prompts
``0 … n-1`` (the batches' ``index``). With shuffling on, epoch ``e`` permutes the blocks (a generator
seeded from ``(seed, e)``), cuts the permuted blocks into *windows* of ``window_blocks`` blocks and
permutes the prompts within each window (seeded from ``(seed, e, window)``): a shuffle that needs one
window in memory (``block_size × window_blocks`` prompts, 16384 by default; a smaller set is shuffled
as a whole, like a list). With shuffling off, every epoch is the source's order.

**Data parallelism and resume.** Exactly :class:`~.sampler.PromptSampler`'s layout: round ``r``
of epoch ``e = r // rounds_per_epoch`` gives rank ``k`` positions ``within × round_size + k × micro
+ [0, micro)`` of the epoch's order (``round_size = micro × dp_size``; ``rounds_per_epoch = n //
round_size``, the incomplete last round dropped). A batch is a pure function of ``(seed, r, rank)``:
resuming at ``consumed_samples = N`` starts at round ``N // round_size`` and seeks straight to the
window that holds it (no replay of the epoch). Every rank reads the whole epoch stream (prompts are
small) and keeps its own slots, so ranks are disjoint within an epoch and their union is the epoch.

**Workers.** The loader's batch sampler (in the main process) hands out round numbers; the dataset
maps a round to its prompts. Which worker serves a round cannot change what the round holds, and
PyTorch returns batches in sampler order, so the stream does not depend on ``num_workers``.
"""
from __future__ import annotations

import bisect
import hashlib
import os
import re
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

from ..errors import InputError, found
from .interface import PromptSource
from .sampler import check_round

DEFAULT_BLOCK_SIZE = 512
DEFAULT_WINDOW_BLOCKS = 32
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skips these members


@dataclass(frozen=True)
class Block:
    """``count`` consecutive prompts of shard ``shard``, the first one (``first_key``, number
    ``first_index`` in the source's order) starting at byte ``offset``."""

    shard: int
    offset: int
    count: int
    first_index: int
    first_key: str


def _seed(*parts) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).hexdigest()
    return int(digest[:15], 16)


def _permutation(n: int, *parts) -> List[int]:
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed(*parts))).tolist()


def _keys(keys: List[str]) -> str:
    shown = ", ".join(keys[:10])
    return shown + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")


class _Unusual(Exception):
    """Something the fast header walk leaves to ``tarfile`` (which then reads the whole shard)."""


_ZERO_BLOCK = bytes(512)
_REGULAR = (b"0", b"\0", b"7")  # tarfile.REGULAR_TYPES (no sparse files: those go to tarfile)
_GNU_TYPES = (b"L", b"K", b"S")


def _nts(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):
        raise _Unusual("base-256 number")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise _Unusual("bad number") from None


def _pax_records(buf: bytes) -> Dict[str, str]:
    out, pos = {}, 0
    while pos < len(buf) and buf[pos:pos + 1] != b"\0":
        space = buf.index(b" ", pos)
        length = int(buf[pos:space])
        keyword, _, value = buf[space + 1:pos + length - 1].partition(b"=")
        out[keyword.decode("utf-8")] = value.decode("utf-8")
        pos += length
    return out


def _fast_members(path: str) -> Iterator[Tuple[int, str, bool, Callable[[], bytes]]]:
    """``(offset, name, is_regular, read)`` of each member, as ``tarfile`` gives them, from the raw headers
    (ustar, POSIX pax and GNU long names; about ten times faster than ``tarfile``). Anything else —
    global pax headers, sparse files, base-256 sizes, a bad checksum, truncation — raises
    :class:`_Unusual`, and the caller reads the shard with ``tarfile`` instead."""
    import mmap

    with open(path, "rb") as f:
        total = os.fstat(f.fileno()).st_size
        if total < 512:
            raise _Unusual("short file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            pos, start, long_name, pax = 0, None, None, {}
            while pos + 512 <= total:
                hdr = mm[pos:pos + 512]
                if hdr == _ZERO_BLOCK:
                    return
                if _number(hdr[148:156]) != 256 + sum(hdr[:148]) + sum(hdr[156:]):
                    raise _Unusual("checksum")
                kind, size = hdr[156:157], _number(hdr[124:136])
                data = pos + 512
                if data + size > total:
                    raise _Unusual("truncated")
                if start is None:
                    start = pos
                try:
                    if kind == b"x":
                        pax = _pax_records(mm[data:data + size])
                    elif kind == b"L":
                        long_name = _nts(mm[data:data + size])
                except (ValueError, UnicodeDecodeError):
                    raise _Unusual("pax or GNU long-name record") from None
                if kind in (b"x", b"L", b"K"):
                    pos = data + (size + 511) // 512 * 512
                    continue
                if kind in (b"g", b"S") or any(k.startswith("GNU.sparse") for k in pax):
                    raise _Unusual("global header or sparse file")
                name = _nts(hdr[0:100])
                if kind == b"\0" and name.endswith("/"):
                    kind = b"5"
                prefix = _nts(hdr[345:500])
                if prefix and kind not in _GNU_TYPES:
                    name = prefix + "/" + name
                if long_name is not None:
                    name = long_name
                if "path" in pax:
                    name = pax["path"]
                if "size" in pax:
                    size = int(pax["size"])
                if data + size > total:
                    raise _Unusual("truncated")
                yield start, name, kind in _REGULAR, (lambda a=data, b=data + size: mm[a:b])
                pos = data + (size + 511) // 512 * 512
                start, long_name, pax = None, None, {}
            if start is not None or pos != total:  # no end-of-archive blocks: only a complete last member is fine
                raise _Unusual("truncated or trailing bytes")


def _tarfile_members(tar: tarfile.TarFile) -> Iterator[Tuple[int, str, bool, Callable[[], bytes]]]:
    while True:
        info = tar.next()
        if info is None:
            return
        tar.members = []  # the scan keeps nothing per member
        yield info.offset, info.name, info.isreg(), (lambda i=info: tar.extractfile(i).read())


def scan_shard(path: str, shard: int, first_index: int, key: str, max_chars: int,
               block_size: int = DEFAULT_BLOCK_SIZE, fast: bool = True) -> List[Block]:
    """Check every prompt of one shard and index it in blocks (see the module docstring). The members
    come from a fast walk over the raw tar headers, or from ``tarfile`` (``fast=False``, and whenever
    the fast walk meets something it leaves to ``tarfile``)."""
    if not os.path.isfile(path):
        raise InputError(key, f"webdataset shard {path!r} does not exist")
    try:
        tar = tarfile.open(path, mode="r:")
    except tarfile.ReadError as e:
        raise InputError(key, f"{path!r} is not a tar archive (expected an uncompressed webdataset .tar shard): "
                              f"{e}") from e
    except OSError as e:
        raise InputError(key, f"cannot read webdataset shard {path!r}: {e}") from e
    with tar:
        if fast:
            try:
                return _index(path, _fast_members(path), shard, first_index, key, max_chars, block_size)
            except (_Unusual, OSError, ValueError):
                pass
        try:
            return _index(path, _tarfile_members(tar), shard, first_index, key, max_chars, block_size)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise InputError(key, f"webdataset shard {path!r} is damaged (reading it stopped at an invalid tar "
                                  f"record): {e}") from e


def _index(path: str, members, shard: int, first_index: int, key: str, max_chars: int,
           block_size: int) -> List[Block]:
    """Group members into samples exactly as webdataset does (``tar_file_iterator``'s skips,
    ``group_by_keys``' keys), check each ``txt``, and cut the prompts into blocks."""
    from webdataset.tariterators import base_plus_ext

    starts: List[Tuple[int, str]] = []  # (offset, key) of each block's first sample
    count = 0
    empty: List[str] = []
    long_: List[str] = []
    undecodable: List[str] = []
    sample_key = None
    sample_offset = 0
    sample_suffixes: set = set()
    sample_txt = None

    def finish():
        nonlocal count
        if sample_key is None or sample_txt is None:
            return
        try:
            text = sample_txt.decode("utf-8").strip()
        except UnicodeDecodeError:
            undecodable.append(sample_key)
            text = "?"
        if not text:
            empty.append(sample_key)
        elif len(text) > max_chars:
            long_.append(sample_key)
        if count % block_size == 0:
            starts.append((sample_offset, sample_key))
        count += 1

    for offset, name, regular, read in members:
        if not regular or name is None:
            continue
        if ("/" not in name and name.startswith("__") and name.endswith("__")) or _SKIP_META.match(name):
            continue
        prefix, suffix = base_plus_ext(name)
        if prefix is None:
            continue
        suffix = suffix.lower()
        if sample_key is None or prefix != sample_key:
            finish()
            sample_key, sample_offset, sample_suffixes, sample_txt = prefix, offset, set(), None
        if suffix in sample_suffixes:
            raise InputError(key, f"webdataset shard {path!r}: sample {prefix!r} has two {suffix!r} members")
        sample_suffixes.add(suffix)
        if suffix == "txt":
            sample_txt = read()
    finish()
    problems = found((undecodable, f"txt not valid UTF-8 in sample(s) {_keys(undecodable)}"),
                     (empty, f"empty prompt in sample(s) {_keys(empty)}"),
                     (long_, f"prompt longer than model.data.max_prompt_chars={max_chars} in sample(s) {_keys(long_)}"))
    if problems:
        raise InputError(key, f"webdataset shard {path!r}: {problems}")
    if count == 0:
        raise InputError(key, f"webdataset shard {path!r} has no prompts (no .txt members)")
    blocks = []
    for j, (offset, first_key) in enumerate(starts):
        n = min(block_size, count - j * block_size)
        blocks.append(Block(shard, offset, n, first_index + j * block_size, first_key))
    return blocks


class WebdatasetPromptSource(PromptSource):
    """Prompts of webdataset tar shards, streamed (see the module docstring for order, sharding, resume)."""

    def __init__(self, shards: Sequence[str], key: str = "model.data.train.dataset_path", max_chars: int = 1000,
                 description: str = "", block_size: int = DEFAULT_BLOCK_SIZE,
                 window_blocks: int = DEFAULT_WINDOW_BLOCKS):
        if block_size < 1 or window_blocks < 1:
            raise ValueError(f"block_size {block_size} and window_blocks {window_blocks} must be >= 1")
        self.shards = [os.path.abspath(s) for s in shards]
        if not self.shards:
            raise InputError(key, f"no webdataset shards in {description!r}")
        self.description = description or "::".join(shards)
        self.block_size = block_size
        self.window_blocks = window_blocks
        self.blocks: List[Block] = []
        self._stamps = []  # (size, mtime) of each shard when it was scanned: a rewrite is an error, not a new order
        n = 0
        for i, path in enumerate(self.shards):
            st = os.stat(path) if os.path.isfile(path) else None
            self._stamps.append((st.st_size, st.st_mtime_ns) if st else None)
            blocks = scan_shard(path, i, n, key, max_chars, block_size)
            self.blocks += blocks
            n += sum(b.count for b in blocks)
        self.num_prompts = n
        self._block_starts = [b.first_index for b in self.blocks]

    def __repr__(self) -> str:
        return (f"WebdatasetPromptSource({self.description!r}: {self.num_prompts} prompts in {len(self.shards)} "
                f"shard(s))")

    # ------------------------------------------------------------------ the source's own order
    def __len__(self) -> int:
        return self.num_prompts

    def read_block(self, b: Block) -> List[Tuple[int, str]]:
        """``(index, prompt)`` of the block's prompts, parsed by webdataset from the block's offset."""
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        path = self.shards[b.shard]
        out: List[Tuple[int, str]] = []
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if (st.st_size, st.st_mtime_ns) != self._stamps[b.shard]:
                raise RuntimeError(f"webdataset shard {path!r} changed since it was opened (size or modification "
                                   f"time): the run's prompt order would no longer be reproducible")
            f.seek(b.offset)
            files = (dict(member, __url__=path) for member in tar_file_iterator(f))
            for sample in group_by_keys(files):
                if "txt" not in sample:
                    continue
                if not out and sample["__key__"] != b.first_key:
                    break
                out.append((b.first_index + len(out), sample["txt"].decode("utf-8").strip()))
                if len(out) == b.count:
                    break
        if len(out) != b.count:
            raise RuntimeError(f"webdataset shard {path!r} changed since it was opened (block at byte {b.offset} "
                               f"no longer starts with sample {b.first_key!r} followed by {b.count} prompts)")
        return out

    def __iter__(self) -> Iterator[str]:
        for b in self.blocks:
            for _, prompt in self.read_block(b):
                yield prompt

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.prompts_at(range(*i.indices(self.num_prompts)))
        j = i + self.num_prompts if i < 0 else i
        if not 0 <= j < self.num_prompts:
            raise IndexError(f"prompt {i} of {self.num_prompts}")
        return self.prompts_at([j])[0]

    def prompts_at(self, indices: Sequence[int]) -> List[str]:
        """Prompts at positions of the source's order, reading each block involved once."""
        cache: Dict[int, List[Tuple[int, str]]] = {}
        out = []
        for j in indices:
            bi = bisect.bisect_right(self._block_starts, j) - 1
            if bi not in cache:
                cache[bi] = self.read_block(self.blocks[bi])
            out.append(cache[bi][j - self.blocks[bi].first_index][1])
        return out

    # ------------------------------------------------------------------ training stream
    def dataloader(self, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                   consumed_samples: Callable[[], int], length: int = 2**62, shuffle: bool = True,
                   num_workers: int = 0):
        import torch

        ds = RoundDataset(self, micro_batch_size, dp_rank, dp_size, seed, shuffle)
        sampler = RoundSampler(ds.round_size, consumed_samples, length)
        return torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_round,
                                           num_workers=num_workers)


class EpochOrder:
    """One epoch's order of a source: its windows (lists of block numbers) and where each starts."""

    def __init__(self, source: WebdatasetPromptSource, epoch: int, seed: int, shuffle: bool):
        nb = len(source.blocks)
        order = _permutation(nb, seed, "webdataset-blocks", epoch) if shuffle else list(range(nb))
        w = source.window_blocks
        self.windows = [order[i:i + w] for i in range(0, nb, w)]
        self.starts = [0]
        for blocks in self.windows:
            self.starts.append(self.starts[-1] + sum(source.blocks[b].count for b in blocks))

    def window_at(self, position: int) -> int:
        return bisect.bisect_right(self.starts, position) - 1


class RoundDataset:
    """Map-style: round ``r`` → this rank's ``(index, prompt)`` pairs of that round. Keeps the current
    epoch's order and the last two windows read."""

    CACHED_WINDOWS = 2

    def __init__(self, source: WebdatasetPromptSource, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 shuffle: bool = True):
        check_round(len(source), micro_batch_size, dp_rank, dp_size)
        self.source = source
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.round_size = micro_batch_size * dp_size
        self.rounds_per_epoch = len(source) // self.round_size
        self._order = None  # (epoch, EpochOrder)
        self._windows: "OrderedDict[Tuple[int, int], List[Tuple[int, str]]]" = OrderedDict()

    def epoch_order(self, epoch: int) -> EpochOrder:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, EpochOrder(self.source, epoch, self.seed, self.shuffle))
        return self._order[1]

    def window(self, epoch: int, w: int) -> List[Tuple[int, str]]:
        key = (epoch, w)
        if key in self._windows:
            self._windows.move_to_end(key)
            return self._windows[key]
        items = [item for b in self.epoch_order(epoch).windows[w] for item in self.source.read_block(self.source.blocks[b])]
        if self.shuffle:
            items = [items[p] for p in _permutation(len(items), self.seed, "webdataset-window", epoch, w)]
        self._windows[key] = items
        while len(self._windows) > self.CACHED_WINDOWS:
            self._windows.popitem(last=False)
        return items

    def take(self, epoch: int, start: int, count: int) -> List[Tuple[int, str]]:
        """``count`` items of epoch ``epoch``'s order from position ``start``."""
        order = self.epoch_order(epoch)
        out: List[Tuple[int, str]] = []
        position = start
        while len(out) < count:
            w = order.window_at(position)
            items = self.window(epoch, w)
            offset = position - order.starts[w]
            got = items[offset:offset + count - len(out)]
            out += got
            position += len(got)
        return out

    def __getitem__(self, round_idx: int) -> List[Tuple[int, str]]:
        epoch, within = divmod(int(round_idx), self.rounds_per_epoch)
        return self.take(epoch, within * self.round_size + self.dp_rank * self.micro_batch_size,
                         self.micro_batch_size)

    def __len__(self) -> int:  # rounds in one epoch (the stream itself is endless)
        return self.rounds_per_epoch


class RoundSampler:
    """Batch sampler of round numbers, from ``consumed_samples() // round_size`` on, endless; ``len`` is
    the ``length`` the run will draw (progress bars), as for :class:`~.sampler.PromptSampler`."""

    def __init__(self, round_size: int, consumed_samples: Callable[[], int], length: int = 2**62):
        self.round_size = round_size
        self.consumed_samples = consumed_samples
        self.length = length

    def __iter__(self) -> Iterator[List[int]]:
        consumed = int(self.consumed_samples())
        if consumed % self.round_size:
            raise ValueError(f"consumed samples {consumed} is not a multiple of the round size {self.round_size}")
        r = consumed // self.round_size
        while True:
            yield [r]
            r += 1

    def __len__(self) -> int:
        return self.length


def collate_round(items: List[List[Tuple[int, str]]]) -> Dict:
    pairs = [pair for round_items in items for pair in round_items]
    return {"prompt": [p for _, p in pairs], "index": [i for i, _ in pairs]}
