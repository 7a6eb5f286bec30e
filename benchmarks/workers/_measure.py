"""Helpers every worker process uses (no torch import here: workers also run in the peer venv)."""
import json
import os
import resource
import sys
import time


def rss_mb() -> float:
    """Current resident set size (MiB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """High-water RSS of this process so far (MiB; Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_steps(step, warmup: int, repeats: int, label: str):
    """Run ``step()`` warmup+repeats times; returns (per-step seconds of the measured ones, RSS before, peak before)."""
    rss_before = rss_mb()  # models loaded, nothing trained yet
    peak_before = peak_rss_mb()
    for i in range(warmup):
        step()
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        print(f"  {label}: step {i + 1}/{repeats} {times[-1]:.3f} s", file=sys.stderr, flush=True)
    return times, rss_before, peak_before


def fault_in(*modules) -> None:
    """Read every parameter and buffer once. Weights loaded from safetensors may be memory-mapped and
    paged in only on first use; touching them here puts them in the RSS measured *before* the first
    step, so "memory added by training" does not count the weights being paged in."""
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if t.numel():
                float(t.detach().reshape(-1)[::1024].sum())  # one element per 4 KiB page of fp32


def emit(result: dict) -> None:
    """Print the result as the last stdout line; ``peak_rss_mb`` is the process's high-water RSS unless
    the worker already set it (e.g. a snapshot taken before a second measurement in the same process)."""
    result.setdefault("peak_rss_mb", peak_rss_mb())
    pkg = sys.modules.get("nemo_aligner_draft")  # which copy of our package ran (None in the peer venv)
    if pkg is not None:
        result.setdefault("package_file", pkg.__file__)
    print(json.dumps(result), flush=True)


def one_thread():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    return torch
