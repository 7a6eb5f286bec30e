"""Shared harness for the benchmarks: one torch thread, fresh subprocess per measured run, medians,
JSON + Markdown + PNG outputs under ``benchmarks/results/``.

Every measured configuration runs in its own subprocess so that its peak RSS (the kernel's
high-water mark, ``ru_maxrss``) belongs to that configuration alone; the worker prints one JSON
object on its last stdout line.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
RESULTS = os.environ.get("NAD_RESULTS_DIR") or os.path.join(BENCH, "results")  # gpu_check.sh points it at $OUT
TMP = os.path.join(RESULTS, "tmp")  # git-ignored: saved tiny pipelines, scratch
OUR_PYTHON = os.environ.get("OUR_PYTHON", os.path.join(ROOT, ".venv", "bin", "python"))
if not os.path.exists(OUR_PYTHON):
    OUR_PYTHON = sys.executable

ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                  "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                  "DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error",
                  "PYTHONWARNINGS": "ignore"}


def log(msg: str) -> None:
    """Progress line on stderr with a wall-clock stamp."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine_info() -> Dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": 1, "python": platform.python_version(),
            "platform": platform.platform(), "date_utc": datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC")}
    try:
        info["load_average_1_5_15"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def ensure_tiny_sd() -> str:
    """Save the shared tiny SD pipeline once (``nemo_aligner_draft.testing.tiny.save_tiny_sd``)."""
    path = os.path.join(TMP, "tiny_sd")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        log(f"saving the tiny SD pipeline to {path}")
        os.makedirs(TMP, exist_ok=True)
        subprocess.run([OUR_PYTHON, "-c", "import sys; from nemo_aligner_draft.testing.tiny import save_tiny_sd; "
                        "save_tiny_sd(sys.argv[1])", path], check=True, cwd=ROOT, env=_env())
    return path


def write_dir_once(path: str, what: str, save) -> str:
    """``save(tmp)`` into a temporary sibling of ``path``, renamed into place when complete (the package's
    ``export.output.atomic_output``), unless ``path`` already exists: an interrupted write leaves nothing."""
    from nemo_aligner_draft.export.output import atomic_output

    if not os.path.isdir(path):
        log(f"writing {what} to {path}")
        with atomic_output(path, is_dir=True) as tmp:
            save(tmp)
    return path


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env.update(ONE_THREAD_ENV)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_worker(python: str, script: str, args: Sequence[str], timeout: float = 1800,
               extra_env: Optional[Dict[str, str]] = None) -> Dict:
    """Run ``python script args`` in a fresh process; return the JSON of its last stdout line."""
    env = _env()
    if extra_env:
        env.update(extra_env)
    t0 = time.perf_counter()
    p = subprocess.run([python, script, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"worker {os.path.basename(script)} {' '.join(args)} failed (rc {p.returncode}):\n"
                           f"{p.stderr[-4000:]}")
    lines = [ln for ln in p.stdout.strip().splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"worker {script} printed no JSON result; stderr:\n{p.stderr[-4000:]}")
    out = json.loads(lines[-1])
    out["process_wall_s"] = time.perf_counter() - t0
    return out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def write_json(name: str, data: Dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
    return path


def write_markdown(name: str, text: str) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.md")
    with open(path, "w") as f:
        f.write(text.rstrip() + "\n")
    return path


def md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def plot_path(name: str) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    return os.path.join(RESULTS, f"{name}.png")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _link_or_copy(src: str, dst: str) -> str:
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def ensure_realsize_sd(family: str = "sd") -> str:
    """The full-size architecture of ``family`` (``nemo_aligner_draft.testing.realsize``; SD1.5 for
    ``sd``) with random weights, saved once in **fp32** so that every environment loads the very same
    fp32 tensors (no dtype conversion on load). Written by a process of its own, to a sibling directory
    that is renamed when complete."""
    path = os.path.join(TMP, f"realsize_{family}_fp32")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        log(f"saving a random full-size {family} pipeline (published shapes, fp32) to {path}")
        os.makedirs(TMP, exist_ok=True)
        tmp = path + ".partial"
        subprocess.run([OUR_PYTHON, "-c", "import sys, shutil, torch, os; shutil.rmtree(sys.argv[2], ignore_errors=True); "
                        "from nemo_aligner_draft.testing.realsize import save_pipeline; "
                        "save_pipeline(sys.argv[1], sys.argv[2], torch.float32); os.replace(sys.argv[2], sys.argv[3])",
                        family, tmp, path], check=True, cwd=ROOT, env=_env())
    return path


def peer_pipeline_copy(src: str) -> str:
    """The same pipeline, readable by the peer's older transformers (4.57): text-encoder keys with
    the ``text_model.`` prefix and a slow-tokenizer directory (vocab.json / merges.txt). The UNet,
    VAE and scheduler files are copied byte for byte; the weights are the same tensors."""
    import shutil

    dst = src.rstrip("/") + "_peer"
    if os.path.isfile(os.path.join(dst, "model_index.json")):
        return dst
    log(f"writing a transformers-4.x readable copy of the pipeline to {dst}")
    tmp = dst + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for sub in ("unet", "vae", "scheduler"):
        # hard links where the file system allows (the full-size UNet is 3.4 GB in fp32): same bytes
        shutil.copytree(os.path.join(src, sub), os.path.join(tmp, sub), copy_function=_link_or_copy)
    shutil.copy(os.path.join(src, "model_index.json"), tmp)
    code = (
        "import os, sys, shutil, json\n"
        "from safetensors.torch import load_file, save_file\n"
        "try:\n"
        "    from nemo_aligner_draft.embedded.tokenizer import cached_clip_tokenizer_dir as _tokenizer_dir\n"
        "except ImportError:  # older checkouts\n"
        "    from nemo_aligner_draft.testing.tiny import _tokenizer_dir\n"
        "src, dst = sys.argv[1], sys.argv[2]\n"
        "os.makedirs(os.path.join(dst, 'text_encoder'))\n"
        "sd = load_file(os.path.join(src, 'text_encoder', 'model.safetensors'))\n"
        "sd = {(k if k.startswith('text_model.') or k.startswith('text_projection') else 'text_model.' + k): v "
        "for k, v in sd.items()}\n"
        "save_file(sd, os.path.join(dst, 'text_encoder', 'model.safetensors'), metadata={'format': 'pt'})\n"
        "shutil.copy(os.path.join(src, 'text_encoder', 'config.json'), os.path.join(dst, 'text_encoder'))\n"
        "shutil.copytree(_tokenizer_dir(), os.path.join(dst, 'tokenizer'))\n"
    )
    subprocess.run([OUR_PYTHON, "-c", code, src, tmp], check=True, cwd=ROOT, env=_env())
    os.replace(tmp, dst)
    return dst
