"""NeMo-Aligner's own DRaFT+ configs validate unchanged, and every one of their keys has a declared fate.

``nemo_aligner_conf/draftp_sd.yaml`` and ``draftp_sdxl.yaml`` are NeMo-Aligner's
``examples/mm/stable_diffusion/conf/`` files at its final commit (af2b3bd9, github:NVIDIA/NeMo-Aligner,
Apache-2.0), unmodified: the input format this test is about. ``nemo_aligner_keys.tsv`` lists every leaf
key of both files with its value there and what the typed config does with it — honoured (a field with
NeMo-Aligner's meaning), mapped (an alias onto one of ours) or notice (accepted, no effect here, one notice
line). The tests check that the table lists exactly the files' keys and values, that the code classifies
each key as the table says, and that both files validate with no rejected key.
"""
import json
import os

import pytest
from omegaconf import OmegaConf

HERE = os.path.dirname(os.path.abspath(__file__))
CONF = os.path.join(HERE, "nemo_aligner_conf")
FILES = ("draftp_sd", "draftp_sdxl")


def leaves(d, prefix=""):
    """(dotted key, value) of every leaf; a list is a leaf (NeMo's emb_models is one value)."""
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            yield from leaves(v, key)
        else:
            yield key, v


def classify(key: str) -> str:
    from nemo_aligner_draft.config.keys import key_table
    from nemo_aligner_draft.config.schema import Config

    rows = key_table(Config)
    notice = [r["key"] for r in rows if r["kind"] == "notice"]
    if any(key == n or key.startswith(n + ".") for n in notice):
        return "notice"
    kinds = {r["kind"] for r in rows if r["key"] == key}
    if not kinds and any(r["kind"] == "honoured" and key.startswith(r["key"] + ".") for r in rows):
        kinds = {"honoured"}  # a key inside a mapping field (wandb_logger_kwargs) is passed on as it is
    return kinds.pop() if len(kinds) == 1 else ("unclassified" if not kinds else "ambiguous:" + ",".join(sorted(kinds)))


def _table():
    rows = {}
    with open(os.path.join(HERE, "nemo_aligner_keys.tsv")) as f:
        lines = [ln.rstrip("\n") for ln in f if not ln.startswith("#")]
    for ln in lines[1:]:
        key, files, default, kind = ln.split("\t")
        rows[key] = {"files": files.split(","), "default": json.loads(default), "kind": kind}
    return rows


def _raw(name, resolve=False):
    return OmegaConf.to_container(OmegaConf.load(os.path.join(CONF, f"{name}.yaml")), resolve=resolve)


def test_the_table_lists_every_leaf_key_of_both_files_with_its_value():
    table = _table()
    seen = {}
    for name in FILES:
        for key, value in leaves(_raw(name)):
            seen.setdefault(key, []).append(name)
            if name == "draftp_sd" or "draftp_sd" not in table[key]["files"]:
                assert table[key]["default"] == value, key
    assert {k: sorted(v) for k, v in seen.items()} == {k: sorted(r["files"]) for k, r in table.items()}
    assert len(seen) == 224 and sum(len(v) for v in seen.values()) == 175 + 170


def test_every_key_is_classified_as_the_table_says():
    table = _table()
    got = {key: classify(key) for key in table}
    wrong = {k: (table[k]["kind"], got[k]) for k in table if got[k] != table[k]["kind"]}
    assert not wrong, wrong
    assert set(got.values()) == {"honoured", "mapped", "notice"}


@pytest.mark.parametrize("name", FILES)
def test_the_files_validate_with_no_rejected_key(name):
    from nemo_aligner_draft.typed import validate_tree
    from nemo_aligner_draft.config.schema import Config

    notices = []
    _, problems = validate_tree(Config, _raw(name, resolve=True), notices=notices)
    # the only problems are the paths the files leave null for the user's command line to fill
    assert sorted(k for k, _ in problems) == ["model.data.train.dataset_path", "model.pretrained", "rm.name"], problems
    table = _table()
    noticed = {k for k, _ in notices}
    expected = {k for k, r in table.items() if r["kind"] == "notice" and name in r["files"]}
    # every notice key present gets its notice line (a notice subtree is one line: its root)
    assert all(any(k == n or k.startswith(n + ".") for n in noticed) for k in expected), sorted(expected - noticed)


def test_a_value_that_would_change_results_is_refused_not_noticed():
    from nemo_aligner_draft.typed import validate_tree
    from nemo_aligner_draft.config.schema import Config

    raw = _raw("draftp_sd", resolve=True)
    raw["model"]["cond_stage_trainable"] = True
    raw["model"]["infer"]["sampler_type"] = "PLMS"
    raw["trainer"]["accumulate_grad_batches"] = 4
    _, problems = validate_tree(Config, raw)
    got = dict(problems)
    assert "only False is supported here" in got["model.cond_stage_trainable"]
    assert "expected DDIM" in got["model.infer.sampler_type"]
    assert "only 1 is supported here" in got["trainer.accumulate_grad_batches"]
