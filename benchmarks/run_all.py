"""Run every benchmark in sequence and collect their Markdown tables into
``benchmarks/results/summary.md`` (the source of docs/benchmarks.md's tables).

Usage: python benchmarks/run_all.py [--skip peer,memory,efficiency,profile,gpu] [--quick]
``--quick`` shrinks every benchmark (fewer pairs/steps) for a smoke run and writes to
``benchmarks/results/tmp/quick/`` instead; its numbers are not the reported ones.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import log, machine_info  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip", default="", help="comma-separated: peer,memory,efficiency,profile,gpu")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    import common

    results = common.RESULTS
    if a.quick:  # smoke numbers must not overwrite the reported ones
        results = common.RESULTS = os.path.join(common.TMP, "quick")
    import bench_gpu_realsize
    import bench_memory
    import bench_peer
    import bench_sample_efficiency
    import profile_step

    q = a.quick
    plan = [
        ("peer", "peer_alignprop", lambda: bench_peer.main(["--pairs", "1", "--steps", "2"] if q else [])),
        ("memory", "memory", lambda: bench_memory.main(["--quick", "--repeats", "1"] if q else [])),
        ("profile", "profile_step", lambda: profile_step.main(["--repeats", "2"] if q else [])),
        ("efficiency", "sample_efficiency", lambda: bench_sample_efficiency.main(
            ["--draft-steps", "5", "--ddpo-epochs", "5", "--eval-every", "5"] if q else [])),
        ("gpu", "gpu_realsize", lambda: bench_gpu_realsize.main([])),
    ]
    done = []
    for key, name, fn in plan:
        if key in skip:
            continue
        log(f"=== {key} ===")
        t0 = time.perf_counter()
        fn()
        log(f"=== {key} done in {time.perf_counter() - t0:.0f} s ===")
        done.append(name)
    m = machine_info()
    parts = [f"# Benchmark results\n\n{m['date_utc']}; CPU {m['cpu']} ({m['logical_cpus']} logical CPUs, "
             f"1 torch thread); load average at the end {m.get('load_average_1_5_15')}.\n"]
    for name in done:
        p = os.path.join(results, f"{name}.md")
        if os.path.exists(p):
            with open(p) as f:
                parts.append(f.read())
    with open(os.path.join(results, "summary.md"), "w") as f:
        f.write("\n".join(parts))
    log(f"wrote {os.path.join(results, 'summary.md')}")


if __name__ == "__main__":
    main()
