"""Safety: weights load with weights_only=True, training touches no network, and the only dynamic
import is a reward's documented ``package.module:callable``."""
import ast
import os
import socket

import pytest

from reliability_helpers import REPO, tiny_args

PACKAGE = os.path.join(REPO, "nemo_aligner_draft")


def _sources():
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                yield os.path.relpath(path, REPO), ast.parse(open(path).read(), path)


def _call_name(node):
    f = node.func
    if isinstance(f, ast.Name):
        return f.id
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
        return f"{f.value.id}.{f.attr}"
    return f.attr if isinstance(f, ast.Attribute) else ""


def test_every_torch_load_uses_weights_only_true():
    calls = []
    for rel, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _call_name(node) == "torch.load":
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                calls.append((rel, node.lineno, ok))
    assert calls, "the scan finds the package's torch.load calls"
    assert [c for c in calls if not c[2]] == [], "torch.load without weights_only=True"
    assert any(rel.endswith("nemo_aligner_draft/files.py") for rel, _, _ in calls), "our own checkpoints too"


def test_no_eval_exec_or_dynamic_import_outside_the_reward_registry():
    found = []
    for rel, tree in _sources():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node)
            # bare builtins, or the qualified dynamic loaders (model.eval() and re.compile() are not these)
            if (isinstance(node.func, ast.Name) and name in ("eval", "exec", "compile", "__import__", "import_module",
                                                            "instantiate", "get_class", "locate")) or \
                    name in ("importlib.import_module", "utils.instantiate", "pydoc.locate", "builtins.eval"):
                found.append((rel, name))
    # the reward registry imports the user's ``package.module:callable``; the algorithm and model-family
    # registries import the recipe and backend classes their own entries name (never a config value:
    # model.algorithm and model.family must be registered names, checked below)
    assert sorted(found) == sorted([(os.path.join("nemo_aligner_draft", "rewards", "base.py"), "importlib.import_module"),
                                    (os.path.join("nemo_aligner_draft", "algorithms", "registry.py"), "importlib.import_module"),
                                    (os.path.join("nemo_aligner_draft", "backends", "registry.py"), "importlib.import_module")]), found


def test_registry_names_from_a_config_are_never_imported():
    from nemo_aligner_draft.config import ConfigError, validate

    raw = {"trainer": {"draftp_sd": {"max_steps": 1}},
           "model": {"pretrained": "/m", "data": {"train": {"dataset_path": "p"}}, "algorithm": "os:system",
                     "family": "subprocess:run"}}
    with pytest.raises(ConfigError) as e:
        validate(raw)
    keys = {p.key for p in e.value.problems}
    assert {"model.algorithm", "model.family"} <= keys


def test_reward_names_import_only_in_module_colon_callable_form():
    from nemo_aligner_draft.rewards.base import resolve_factory

    with pytest.raises(ValueError, match="unknown reward 'os.system'"):
        resolve_factory("os.system")  # dotted path without ':' is never imported
    with pytest.raises(ValueError, match="has no attribute"):
        resolve_factory("json:no_such_callable")
    assert resolve_factory("test_safety:_a_reward") is _a_reward


def _a_reward(**kwargs):
    return lambda images, prompts: images.mean(dim=(1, 2, 3))


def test_training_touches_no_network(tiny_sd_dir, tmp_path, monkeypatch):
    """A whole run (model, reward, Lightning, exp_manager, .nemo and LoRA export) with every non-loopback
    connection and name lookup refused; any attempt is recorded and fails the test."""
    from nemo_aligner_draft.cli.train import main

    attempts = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def local(host):
        return host in ("localhost", "127.0.0.1", "::1", "") or str(host).startswith("127.")

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not local(address[0]):
            attempts.append(("connect", address))
            raise OSError("network disabled by test")
        return real_connect(self, address)

    def getaddrinfo(host, *a, **k):
        if not local(host):
            attempts.append(("getaddrinfo", host))
            raise socket.gaierror("network disabled by test")
        return real_getaddrinfo(host, *a, **k)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    run = tmp_path / "run"
    assert main(tiny_args(tiny_sd_dir, run, 1)) == 0
    assert (run / "export" / "pytorch_lora_weights.safetensors").is_file()
    assert attempts == []
    # the guard itself works (else the empty list proves nothing)
    with pytest.raises(OSError):
        socket.create_connection(("203.0.113.1", 80), timeout=1)
    assert attempts
