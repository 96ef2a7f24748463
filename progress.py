"""Progress of long work, on a terminal and in a log. On a terminal: tqdm's bar. Where the
output is a file (a batch job's log, ``nohup``, ``| tee``) tqdm would stay silent, and a
CPU epoch of half an hour would show no sign of life: there a plain line is written at most
every ``LOG_SECONDS``, from the first minute of a loop on, with what the bar would show.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable, TextIO

from tqdm import tqdm

LOG_SECONDS = 60.0


def progress(iterable: Iterable, desc: str, total: int | None = None, show: bool = True, initial: int = 0) -> tqdm:
    """``iterable`` with its progress shown (``show`` False: not at all, e.g. torchrun's
    other ranks; ``initial``: done before, by an earlier run); ``set_postfix`` and the rest of
    tqdm work either way."""
    if not show:
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, initial=initial, leave=False)
    return LoggedBar(iterable, desc=desc, total=total, initial=initial, leave=False, file=LogLines(sys.stderr),
                     disable=False, mininterval=LOG_SECONDS, maxinterval=LOG_SECONDS, delay=LOG_SECONDS, ascii=True,
                     ncols=100)


class LoggedBar(tqdm):
    """tqdm for a log: a new postfix (the loss) waits for the next timed line instead of
    writing one of its own."""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


class LogLines:
    """A file for tqdm that turns its redrawn line (``\\r`` + text) into one log line per
    update; the blank line that clears a finished bar is dropped."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.rsplit("\r", 1)[-1].rstrip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # anything else tqdm asks of a file
        return getattr(self.stream, name)
