"""The benches' progress output: one line per reconstructed unit on stderr when asked, and no
progress bar when stderr is not a terminal."""

from __future__ import annotations

import logging
import re
import sys

import pytest

import qcompiler

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

from common import quiet  # noqa: E402

UNIT_LINE = re.compile(r"^\d\d:\d\d:\d\d \d+/\d+ unit\d+")


@pytest.fixture
def restore_logging():
    loggers = [logging.getLogger(n) for n in ("qcompiler", "qcompiler.reconstruct")]
    saved = [(lg.level, list(lg.handlers), lg.propagate) for lg in loggers]
    yield
    for lg, (level, handlers, propagate) in zip(loggers, saved, strict=True):
        lg.setLevel(level)
        lg.handlers[:] = handlers
        lg.propagate = propagate


@pytest.mark.parametrize("progress", [True, False])
def test_unit_lines_on_stderr_only_with_progress(tiny, capfd, restore_logging, progress):
    quiet(progress=progress)
    r = qcompiler.compile(str(tiny), bits="w4a4", method="qdrop", iters=60)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if UNIT_LINE.match(line)]
    if progress:
        assert len(lines) == len(r.report["reconstruction"]["units"]) >= 2, err
        assert "left" in lines[0] and "loss" in lines[0]
        estimate = [line for line in err.splitlines() if "roughly" in line]  # the time estimate, once
        assert len(estimate) == 1 and re.match(r"^\d\d:\d\d:\d\d ", estimate[0]), err
    else:
        assert lines == [], err
    assert "\r" not in err and "it/s" not in err, err  # the bar stays off: stderr is not a terminal
