"""docs/migrating_from_nemo_aligner.md's key table is the one the code declares (it cannot drift), and the
doc's command lines are the ones tests/cli/test_nemo_aligner_commands.py runs."""
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(REPO, "docs", "migrating_from_nemo_aligner.md")


def test_the_key_table_is_generated_from_the_code():
    from nemo_aligner_draft.config.keys import TABLE_BEGIN, TABLE_END, key_table_markdown

    text = open(DOC, encoding="utf-8").read()
    table = text[text.index(TABLE_BEGIN):text.index(TABLE_END) + len(TABLE_END)]
    assert table == key_table_markdown(), "run `python -m nemo_aligner_draft.config.keys`"
    rows = [ln for ln in table.splitlines() if ln.startswith("| `")]
    kinds = {re.match(r"\| `[^`]+` \| (\w+) \|", ln).group(1) for ln in rows}
    assert len(rows) > 250 and kinds == {"honoured", "mapped", "notice"}


def test_the_doc_shows_the_tested_command_lines():
    import sys

    sys.path.insert(0, os.path.join(REPO, "tests", "cli"))
    import test_nemo_aligner_commands as t

    doc = " ".join(open(DOC, encoding="utf-8").read().replace("\\\n", " ").split())
    for command in (t.TORCHRUN_SD, t.SLURM_SD, t.AIG_SDXL):
        overrides = [w for w in command.replace("\\\n", " ").split() if "=" in w and not w.startswith("--")]
        missing = [w for w in overrides if w not in doc]
        assert not missing, missing
