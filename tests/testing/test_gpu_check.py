"""benchmarks/gpu_check.sh and the script it runs, on this GPU-less machine: the check says it measured
nothing and exits 0; the benchmark's own code path runs on the tiny configs (``--smoke-cpu``) and writes
one row per requested configuration where it is told to (``NAD_RESULTS_DIR``, as the check sets it)."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env(results):
    env = dict(os.environ, OMP_NUM_THREADS="1", NAD_RESULTS_DIR=str(results), PYTHON=sys.executable)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the no-GPU branch of the check")
def test_gpu_check_without_a_gpu_measures_nothing_and_says_so(tmp_path):
    r = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh")], env=dict(_env(tmp_path),
                       RESULTS=str(tmp_path)), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "no CUDA device; nothing measured" in (tmp_path / "gpu_check.log").read_text()


def test_benchmark_code_path_runs_each_requested_configuration(tmp_path):
    script = os.path.join(REPO, "benchmarks", "bench_gpu_realsize.py")
    r = subprocess.run([sys.executable, script, "--smoke-cpu", "--configs", "1,2c,Tc", "--out", "smoke_check"],
                       env=_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "smoke_check.json").read_text())
    rows = [(row["K"], row["checkpoint"]) for row in data["rows"]]
    assert rows == [(1, False), (2, True), (4, True)]  # the smoke run caps T at 4
    assert all(row["lora_params"] > 0 and len(row["step_s"]) == 1 for row in data["rows"])


@pytest.mark.parametrize("args,sampler", [(["--family", "sd3"], "flow"),
                                          (["--family", "sd3", "--algorithm", "grpo"], "flow"),
                                          (["--algorithm", "grpo"], "DDIM")])
def test_benchmark_sd3_and_grpo_code_paths(tmp_path, args, sampler):
    """The SD3.5-M parts of the check (sd35m_draftp, sd35m_grpo) on the tiny SD3.5 pipeline, saved and loaded
    through load_backend as the real-size part does; GRPO on SD's DDIM SDE too."""
    script = os.path.join(REPO, "benchmarks", "bench_gpu_realsize.py")
    r = subprocess.run([sys.executable, script, "--smoke-cpu", "--workdir", str(tmp_path), *args, "--out", "smoke"],
                       env=_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert f"{sampler} steps" in (tmp_path / "smoke.md").read_text()
    (row,) = data["rows"] if "grpo" in args else data["rows"][:1]
    assert row["lora_params"] > 0 and len(row["step_s"]) == 1
    if "grpo" in args:  # a group of 2 on 4 rollout steps, every step but the last one percent trained
        assert (data["settings"]["algorithm"], row["micro_batch"], row["trained_steps"]) == ("grpo", 2, 3)


def test_gpu_check_refuses_an_unknown_part(tmp_path):
    r = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh")],
                       env=dict(_env(tmp_path), RESULTS=str(tmp_path), PARTS="sd15 sd4"), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "PARTS: unknown part 'sd4'" in r.stderr, r.stderr
