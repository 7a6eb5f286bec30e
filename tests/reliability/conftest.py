"""In-process runs of ``main`` call ``logging.basicConfig`` and NeMo/Lightning attach stream handlers
to whatever ``sys.stderr`` was at the time — pytest's capture of an earlier test, closed since.
Drop such handlers so a later test's stderr holds only what that test's run printed."""
import logging

import pytest


def _drop_closed_stream_handlers():
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in list(lg.handlers):
            stream = getattr(h, "stream", None)
            if isinstance(h, logging.StreamHandler) and getattr(stream, "closed", False):
                lg.removeHandler(h)


@pytest.fixture(autouse=True)
def _fresh_log_streams():
    _drop_closed_stream_handlers()
    yield
    _drop_closed_stream_handlers()
