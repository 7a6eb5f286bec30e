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


def emit(result: dict) -> None:
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result), flush=True)


def one_thread():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    return torch
