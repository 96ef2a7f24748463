"""Progress in a log (a batch job's output): plain lines at most every LOG_SECONDS, none for
short loops, the loss carried on the next line; on a terminal, tqdm's own bar."""
from __future__ import annotations

import io
import time

import pytest

import progress


def test_a_log_gets_timed_lines_not_redrawn_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()  # not a terminal
    monkeypatch.setattr(progress.sys, "stderr", log)
    monkeypatch.setattr(progress, "LOG_SECONDS", 0.05)
    bar = progress.progress(range(6), "epoch 1/4")
    for step in bar:
        time.sleep(0.03)
        bar.set_postfix(loss=f"{step / 10:.2f}")  # no line of its own
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and 1 <= len(lines) <= 5
    assert all(line.startswith("epoch 1/4:") for line in lines) and "6/6" in lines[-1] and "loss=0.50" in lines[-1]
    log.truncate(0)
    log.seek(0)
    monkeypatch.setattr(progress, "LOG_SECONDS", 60.0)
    assert list(progress.progress(range(3), "short")) == [0, 1, 2] and log.getvalue() == ""  # under a minute: silent
    assert list(progress.progress(range(3), "hidden", show=False)) == [0, 1, 2]


def test_a_terminal_gets_tqdms_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    monkeypatch.setattr(progress.sys, "stderr", screen)
    bar = progress.progress(range(2), "predict", initial=3, total=5)
    assert not isinstance(bar, progress.LoggedBar) and bar.n == 3
    assert list(bar) == [0, 1] and "\r" in screen.getvalue()
