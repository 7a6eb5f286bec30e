"""Writing prompt shards the way NeMo-Aligner's DRaFT+ guide does (docs/user-guide/draftp.rst): one sample
per prompt, ``{"__key__": "sample%06d" % index, "txt": prompt}``, with ``webdataset.TarWriter``."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RELIABILITY = os.path.join(REPO, "tests", "reliability")
if RELIABILITY not in sys.path:  # the shared CLI helpers of the reliability tests
    sys.path.insert(0, RELIABILITY)


def write_shard(path, prompts, start=0):
    """One .tar shard, exactly as the guide's conversion snippet (keys numbered from ``start``)."""
    import webdataset as wds

    sink = wds.TarWriter(str(path))
    for index, line in enumerate(prompts):
        sink.write({
            "__key__": "sample%06d" % (start + index),
            "txt": line.strip(),
        })
    sink.close()
    return str(path)


def write_shards(directory, prompts, sizes, pattern="shard-{:03d}.tar"):
    """``prompts`` split over shards of ``sizes`` in ``directory`` (keys continue across shards)."""
    os.makedirs(directory, exist_ok=True)
    paths, start = [], 0
    for i, n in enumerate(sizes):
        paths.append(write_shard(os.path.join(directory, pattern.format(i)), prompts[start:start + n], start))
        start += n
    assert start == len(prompts)
    return paths


def write_samples(path, samples):
    """Arbitrary samples (for bad or mixed shards): a list of dicts for TarWriter."""
    import webdataset as wds

    sink = wds.TarWriter(str(path))
    for sample in samples:
        sink.write(sample)
    sink.close()
    return str(path)


def prompts(n, stem="a photo of object"):
    return [f"{stem} {i}" for i in range(n)]
