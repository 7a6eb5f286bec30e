"""Webdataset prompt shards (NeMo-Aligner's DRaFT+ data): the prompts come out, ranks are disjoint and
cover the epoch, a stream opened at consumed samples N continues exactly, bad shards are one clear
InputError of the given key — and list sources are what they always were."""
import gzip
import io
import os
import tarfile

import pytest
import torch
from wds_helpers import prompts, write_samples, write_shard, write_shards

from nemo_aligner_draft.data.prompts import PromptDataset, collate_prompts, load_prompts
from nemo_aligner_draft.data.sampler import PromptSampler
from nemo_aligner_draft.data.source import ListPromptSource, open_prompt_source
from nemo_aligner_draft.data.webdataset_source import RoundDataset, WebdatasetPromptSource
from nemo_aligner_draft.errors import InputError

KEY = "model.data.webdataset.local_root_path"


def _take(source, k, micro, rank, dp, consumed=0, seed=3, **kw):
    it = iter(source.dataloader(micro, rank, dp, seed, consumed_samples=lambda: consumed, **kw))
    return [next(it) for _ in range(k)]


def _small(directory, n=23, sizes=(10, 8, 5)):
    """Three shards, blocks of 3 and windows of 2 blocks: every path of the epoch order is exercised."""
    paths = write_shards(directory, prompts(n), sizes)
    return WebdatasetPromptSource(paths, key=KEY, block_size=3, window_blocks=2)


# --------------------------------------------------------------------------- (a) the prompts come out
def test_a_tar_a_directory_and_a_brace_pattern_give_the_prompts(tmp_path):
    everything = prompts(23)
    write_shards(tmp_path / "shards", everything, (10, 8, 5))
    single = write_shard(tmp_path / "all.tar", everything)
    for spec in (single, str(tmp_path / "shards"), str(tmp_path / "shards" / "shard-{000..002}.tar"),
                 str(tmp_path / "shards" / "*.tar")):
        source = open_prompt_source(spec, KEY, 1000)
        assert isinstance(source, WebdatasetPromptSource), spec
        assert len(source) == 23
        assert list(source) == everything
        assert source[:3] == everything[:3] and source[7] == everything[7] and source[-1] == everything[-1]
        assert source[20:] == everything[20:]
    partial = open_prompt_source(str(tmp_path / "shards" / "shard-{000..001}.tar"), KEY, 1000)
    assert list(partial) == everything[:18]


def test_prompts_are_the_txt_member_decoded_and_stripped(tmp_path):
    path = write_samples(tmp_path / "mixed.tar", [
        {"__key__": "sample000000", "txt": "  a red cube \n", "json": {"score": 1}},
        {"__key__": "sample000001", "jpg": b"\xff\xd8 not really a jpeg"},  # no txt: not a prompt
        {"__key__": "sample000002", "txt": "ein Würfel".encode("utf-8")},
    ])
    source = open_prompt_source(path, KEY, 1000)
    assert list(source) == ["a red cube", "ein Würfel"]
    batch = _take(source, 1, 2, 0, 1, seed=0, shuffle=False)[0]
    assert batch == {"prompt": ["a red cube", "ein Würfel"], "index": [0, 1]}


def test_only_an_index_is_held_and_a_resume_reads_one_window(tmp_path, monkeypatch):
    source = WebdatasetPromptSource(write_shards(tmp_path, prompts(400), (150, 250)), block_size=8, window_blocks=4)
    assert len(source) == 400 and len(source.blocks) == 19 + 32  # ceil(150/8) + ceil(250/8)
    texts = set(prompts(400))
    assert not any(isinstance(v, list) and texts & {x for x in v if isinstance(x, str)}
                   for v in vars(source).values()), "the source holds prompts"
    reads = []
    real = WebdatasetPromptSource.read_block
    monkeypatch.setattr(WebdatasetPromptSource, "read_block", lambda self, b: reads.append(b) or real(self, b))
    ds = RoundDataset(source, 2, 1, 2, seed=5)
    ds[57]  # deep into epoch 0 (and below: epoch 1): no replay of what came before
    assert len(reads) <= 4
    ds[100 + 30]
    assert len(reads) <= 8
    assert len(ds._windows) <= RoundDataset.CACHED_WINDOWS


# --------------------------------------------------------------------------- (b) data parallelism
@pytest.mark.parametrize("micro,dp", [(2, 2), (3, 2), (1, 4)])
def test_ranks_are_disjoint_and_cover_each_epoch(tmp_path, micro, dp):
    source = _small(tmp_path, n=24, sizes=(10, 9, 5))
    rounds = 24 // (micro * dp)
    per_rank = [_take(source, 3 * rounds, micro, r, dp) for r in range(dp)]
    epochs = []
    for e in range(3):
        seen = [p for batches in per_rank for b in batches[e * rounds:(e + 1) * rounds] for p in b["prompt"]]
        index = [i for batches in per_rank for b in batches[e * rounds:(e + 1) * rounds] for i in b["index"]]
        assert len(seen) == len(set(seen)) == rounds * micro * dp, f"epoch {e}: a prompt twice"
        if rounds * micro * dp == 24:
            assert sorted(seen) == sorted(prompts(24)), f"epoch {e} is not a full pass"
        assert [source[i] for i in index] == seen
        epochs.append([i for b in per_rank[0][e * rounds:(e + 1) * rounds] for i in b["index"]])
    assert epochs[0] != epochs[1] != epochs[2], "epochs are reshuffled"


def test_incomplete_last_round_is_dropped_like_the_list_sampler(tmp_path):
    source = _small(tmp_path)  # 23 prompts, rounds of 4: 5 rounds (20 prompts) an epoch
    batches = [_take(source, 10, 2, r, 2) for r in range(2)]
    for e in range(2):
        seen = [i for b in batches for x in b[5 * e:5 * e + 5] for i in x["index"]]
        assert len(set(seen)) == 20


def test_shuffle_off_streams_the_file_order_every_epoch(tmp_path):
    source = _small(tmp_path, n=24, sizes=(10, 9, 5))
    r0, r1 = (_take(source, 6, 2, r, 2, shuffle=False) for r in range(2))
    assert [b["index"] for b in r0] == [[0, 1], [4, 5], [8, 9], [12, 13], [16, 17], [20, 21]]
    assert [b["index"] for b in r1] == [[2, 3], [6, 7], [10, 11], [14, 15], [18, 19], [22, 23]]
    assert _take(source, 12, 2, 0, 2, shuffle=False)[6:] == r0


def test_the_order_comes_from_the_seed(tmp_path):
    source = _small(tmp_path)
    a, b, c = (_take(source, 5, 2, 0, 2, seed=s) for s in (1, 1, 2))
    assert a == b and a != c


# --------------------------------------------------------------------------- (c) exact resume
@pytest.mark.parametrize("k_rounds", [0, 1, 4, 5, 6, 12])
def test_resume_at_consumed_samples_continues_exactly(tmp_path, k_rounds):
    source = _small(tmp_path)  # 5 rounds an epoch: k crosses epoch boundaries
    micro, dp, total = 2, 2, 17
    for rank in range(dp):
        uninterrupted = _take(source, total, micro, rank, dp)
        resumed = _take(source, total - k_rounds, micro, rank, dp, consumed=k_rounds * micro * dp)
        assert resumed == uninterrupted[k_rounds:], f"rank {rank} after {k_rounds} rounds"


def test_a_fresh_source_resumes_the_same_stream(tmp_path):
    """What a restarted process does: open the shards anew, start at consumed samples."""
    first = _small(tmp_path / "x")
    again = WebdatasetPromptSource(first.shards, key=KEY, block_size=3, window_blocks=2)
    assert _take(again, 6, 2, 1, 2, consumed=28) == _take(first, 13, 2, 1, 2)[7:]


def test_resume_off_the_round_grid_is_refused(tmp_path):
    with pytest.raises(ValueError, match="round size 4"):
        _take(_small(tmp_path), 1, 2, 0, 2, consumed=6)


def test_the_order_does_not_depend_on_num_workers(tmp_path):
    source = _small(tmp_path)
    plain = _take(source, 12, 2, 1, 2, consumed=8)
    assert _take(source, 12, 2, 1, 2, consumed=8, num_workers=2) == plain


# --------------------------------------------------------------------------- (d) bad input
def _not_a_tar(d):
    (d / "notes.tar").write_text("a cat\na dog\n")
    return str(d / "notes.tar")


def _gzipped(d):
    raw = write_shard(d / "plain.tar", ["a cat", "a dog"])
    with open(raw, "rb") as f, gzip.open(d / "packed.tar", "wb") as g:
        g.write(f.read())
    return str(d / "packed.tar")


def _truncated(d):
    raw = write_shard(d / "full.tar", prompts(5))
    data = open(raw, "rb").read()
    (d / "cut.tar").write_bytes(data[:2048 * 2 + 700])
    return str(d / "cut.tar")


def _no_txt(d):
    return write_samples(d / "images.tar", [{"__key__": "sample000000", "jpg": b"\xff\xd8"},
                                            {"__key__": "sample000001", "json": {"caption": "a cat"}}])


def _empty_prompt(d):
    return write_samples(d / "holes.tar", [{"__key__": "sample000000", "txt": "a cat"},
                                           {"__key__": "sample000001", "txt": "   "},
                                           {"__key__": "sample000002", "txt": "a dog"}])


def _second_shard_empty(d):
    write_shard(d / "s-0.tar", ["a cat", "a dog"])
    write_samples(d / "s-1.tar", [{"__key__": "sample000002", "json": {}}])
    return str(d / "s-{0..1}.tar")


def _missing_shard(d):
    write_shard(d / "p-0.tar", ["a cat"])
    return str(d / "p-{0..2}.tar")


def _bad_utf8(d):
    return write_samples(d / "latin1.tar", [{"__key__": "sample000000", "txt": "caf\xe9".encode("latin-1")}])


def _too_long(d):
    return write_shard(d / "long.tar", ["a cat", "x" * 50])


def _two_txt(d):
    path = d / "dup.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("sample000000.txt", "sample000000.TXT"):
            info = tarfile.TarInfo(name)
            info.size = 5
            tar.addfile(info, io.BytesIO(b"a cat"))
    return str(path)


def _empty_dir(d):
    (d / "nothing").mkdir()
    (d / "nothing" / "readme.txt").write_text("no shards here\n")
    return str(d / "nothing")


BAD = [
    ("missing path", lambda d: str(d / "nope.tar"), ["webdataset shard", "nope.tar' does not exist"]),
    ("missing shard of a pattern", _missing_shard, ["2 of the 3 webdataset shard(s)", "p-1.tar", "p-2.tar"]),
    ("glob matching nothing", lambda d: str(d / "none-*.tar"), ["no webdataset shard matches"]),
    ("a .tar that is not a tar", _not_a_tar, ["notes.tar' is not a tar archive"]),
    ("a gzipped tar", _gzipped, ["packed.tar' is not a tar archive", "uncompressed"]),
    ("a truncated tar", _truncated, ["cut.tar' is damaged"]),
    ("a shard without txt", _no_txt, ["webdataset shard", "images.tar' has no prompts (no .txt members)"]),
    ("one of two shards without txt", _second_shard_empty, ["s-1.tar' has no prompts (no .txt members)"]),
    ("an empty prompt", _empty_prompt, ["holes.tar': empty prompt in sample(s) sample000001"]),
    ("txt not UTF-8", _bad_utf8, ["txt not valid UTF-8 in sample(s) sample000000"]),
    ("prompt too long", _too_long, ["prompt longer than model.data.max_prompt_chars=40 in sample(s) sample000001"]),
    ("two txt members in a sample", _two_txt, ["sample 'sample000000' has two 'txt' members"]),
    ("a directory without shards", _empty_dir, ["is a directory with no .tar shards"]),
]


@pytest.mark.parametrize("case,make,expect", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_an_input_error_of_the_given_key(tmp_path, case, make, expect):
    spec = make(tmp_path)
    with pytest.raises(InputError) as e:
        open_prompt_source(spec, KEY, 40)
    assert e.value.key == KEY
    for fragment in expect:
        assert fragment in e.value.message, (case, e.value.message)
    assert "\n" not in str(e.value)


def test_a_shard_rewritten_after_opening_is_detected(tmp_path):
    path = write_shard(tmp_path / "p.tar", prompts(6))
    source = WebdatasetPromptSource([path], block_size=2)
    write_shard(path, ["other"] * 2 + prompts(6))
    with pytest.raises(RuntimeError, match="changed since it was opened"):
        source[5]


# --------------------------------------------------------------------------- list sources as before
def test_list_sources_are_the_lists_of_load_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\na dog\na fox\n")
    for spec in (str(tmp_path / "p.txt"), "builtin:animals"):
        source = open_prompt_source(spec, "model.data.train.dataset_path", 1000)
        assert isinstance(source, ListPromptSource) and isinstance(source, list)
        assert source == load_prompts(spec)
    with pytest.raises(InputError, match="does not exist"):
        open_prompt_source(str(tmp_path / "nope.txt"))


def test_a_list_source_streams_exactly_what_the_prompt_sampler_did():
    source = open_prompt_source("builtin:animals")
    for rank in range(2):
        old = torch.utils.data.DataLoader(
            PromptDataset(source), collate_fn=collate_prompts, num_workers=0,
            batch_sampler=PromptSampler(len(source), 2, rank, 2, 9, consumed_samples=lambda: 8))
        got = _take(source, 7, 2, rank, 2, consumed=8, seed=9)
        it = iter(old)
        assert got == [next(it) for _ in range(7)]


def test_a_tar_named_otherwise_is_still_a_shard(tmp_path):
    path = write_shard(tmp_path / "prompts.shard", ["a cat", "a dog"])
    assert list(open_prompt_source(path)) == ["a cat", "a dog"]
    assert os.path.exists(path)


# --------------------------------------------------------------------------- the index agrees with webdataset
def _add(tar, name, data=b"", kind=tarfile.REGTYPE):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _odd_tar(path, fmt, pax_headers=None):
    """Long names (GNU long-name records, ustar prefixes, pax paths), directories, meta files, members
    without an extension, upper-case suffixes, a key that comes back after another one, non-ASCII names."""
    long_dir = "d" * 80 + "/" + "e" * 40
    with tarfile.open(path, "w", format=fmt, pax_headers=pax_headers or {}) as tar:
        _add(tar, "shards", kind=tarfile.DIRTYPE)
        _add(tar, "__meta__", b"ignored")
        _add(tar, "a/one.txt", b"first prompt")
        _add(tar, "a/one.json", b"{}")
        _add(tar, "README", b"no extension: no sample")
        _add(tar, f"{long_dir}/two.TXT", b" second prompt ")
        _add(tar, "b/three.jpg", b"\xff\xd8")  # a sample without txt
        _add(tar, "c/four.txt", b"fourth prompt")
        _add(tar, "a/one.cls", b"1")  # key a/one again, after c/four: a new sample (as webdataset groups)
        _add(tar, "a/one.txt", b"fifth prompt")
        if fmt != tarfile.USTAR_FORMAT:
            _add(tar, "x" * 150 + ".txt", b"sixth prompt")
        if fmt == tarfile.PAX_FORMAT:
            _add(tar, "caf\u00e9/s\u00e9ance.txt", "seventh prompt".encode())
    return str(path)


@pytest.mark.parametrize("fmt,pax", [(tarfile.PAX_FORMAT, None), (tarfile.GNU_FORMAT, None),
                                     (tarfile.USTAR_FORMAT, None), (tarfile.PAX_FORMAT, {"comment": "global"})],
                         ids=["pax", "gnu", "ustar", "pax-global-header"])
def test_the_fast_index_is_tarfiles_and_the_prompts_are_webdatasets(tmp_path, fmt, pax):
    import webdataset as wds

    from nemo_aligner_draft.data.webdataset_source import _fast_members, _Unusual, scan_shard

    path = _odd_tar(tmp_path / "odd.tar", fmt, pax)
    if pax:  # a global header is left to tarfile
        with pytest.raises(_Unusual):
            list(_fast_members(path))
    else:  # the fast walk reads these itself, member for member what tarfile lists
        with tarfile.open(path) as tar:
            listed = [(m.offset, m.isreg(), m.name if m.isreg() else None) for m in tar]
        assert [(o, r, n if r else None) for o, n, r, _ in _fast_members(path)] == listed
    slow = scan_shard(path, 0, 0, KEY, 1000, block_size=2, fast=False)
    assert scan_shard(path, 0, 0, KEY, 1000, block_size=2) == slow
    expected = [s["txt"].decode().strip() for s in wds.WebDataset(path, shardshuffle=False) if "txt" in s]
    assert len(expected) >= 4
    source = WebdatasetPromptSource([path], block_size=2, window_blocks=1)
    assert list(source) == expected
    big = write_shard(tmp_path / "big.tar", prompts(300))
    assert scan_shard(big, 0, 0, KEY, 1000, block_size=7) == scan_shard(big, 0, 0, KEY, 1000, block_size=7, fast=False)
