"""In-process runs of ``main`` here meet the stale log handlers that tests/reliability/conftest.py
drops; reuse its fixture's function (loaded by path: every test folder's conftest is ``conftest``)."""
import importlib.util
import os

import pytest
import wds_helpers

_spec = importlib.util.spec_from_file_location("_reliability_conftest", os.path.join(wds_helpers.RELIABILITY,
                                                                                     "conftest.py"))
_reliability = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_reliability)


@pytest.fixture(autouse=True)
def _fresh_log_streams():
    _reliability._drop_closed_stream_handlers()
    yield
    _reliability._drop_closed_stream_handlers()
