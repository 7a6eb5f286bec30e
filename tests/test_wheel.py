"""A non-editable install ships what a user needs: the configs and the embedded model inside the package,
and ``nad-train --config-name=draftp_tiny`` works from a directory outside the repository.

The wheel is built from a copy of the source tree (so no build/ or egg-info lands in the checkout) with
the venv's own setuptools, installed with ``pip install --target`` (its dependencies are the ones this
venv already has), and run with that target first on ``PYTHONPATH`` from a temporary working directory.
"""
import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "nemo_aligner_draft")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "MANIFEST.in", "README.md", "constraints.txt"):
        shutil.copy(os.path.join(REPO, name), src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(os.path.join(REPO, "conf"), src / "conf", ignore=ignore)
    shutil.copytree(PACKAGE, src / "nemo_aligner_draft", ignore=ignore)
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(dist), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = glob.glob(str(dist / "*.whl"))
    return whl


def _package_files(pattern_root: str, suffixes=None):
    out = []
    for root, dirs, files in os.walk(pattern_root):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            if suffixes is None or f.endswith(suffixes):
                out.append(os.path.relpath(os.path.join(root, f), REPO))
    return out


def test_wheel_holds_configs_assets_modules_and_entry_points(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = sorted(f for f in os.listdir(os.path.join(REPO, "conf")) if f.endswith(".yaml"))
    assert configs, "no configs in conf/"
    missing_conf = [c for c in configs if f"nemo_aligner_draft/conf/{c}" not in names]
    assert not missing_conf, missing_conf
    assets = _package_files(os.path.join(PACKAGE, "embedded", "assets"))
    assert len(assets) > 10, assets
    modules = _package_files(PACKAGE, (".py",))
    missing = [f for f in assets + modules if f not in names]
    assert not missing, missing[:20]
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in ("nad-train", "nad-generate", "nad-convert"):
        assert f"{script} = nemo_aligner_draft.cli." in text, text


def test_installed_wheel_trains_from_outside_the_repository(wheel, tiny_sd_dir, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), wheel],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    where = subprocess.run([sys.executable, "-c", "import nemo_aligner_draft; print(nemo_aligner_draft.__file__)"],
                           capture_output=True, text=True, cwd=work, env=env, timeout=120)
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    run = work / "run"
    args = [str(site / "bin" / "nad-train"), "--config-name=draftp_tiny", f"model.pretrained={tiny_sd_dir}",
            f"exp_manager.explicit_log_dir={run}", "trainer.max_steps=1", "trainer.draftp_sd.max_steps=1",
            "trainer.draftp_sd.val_check_interval=0", "model.infer.inference_steps=2",
            "exp_manager.create_tensorboard_logger=false"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=work, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    used = os.path.join(str(site), "nemo_aligner_draft", "conf", "draftp_tiny.yaml")
    assert f"config: {used}" in proc.stdout + proc.stderr
    assert (run / "config.yaml").is_file() and (run / "metrics.json").is_file()
