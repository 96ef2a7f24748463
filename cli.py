"""How every script answers expected bad input: one line on stderr and exit status 2, as
argparse does for a bad flag. A traceback is for bugs; ``CELLSEG_DEBUG=1`` shows it anyway.

    if __name__ == "__main__":
        run_cli(main)
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Sequence

from errors import EXPECTED_ERRORS

DEBUG_ENV = "CELLSEG_DEBUG"
EXIT_USAGE = 2
EXIT_INTERRUPT = 130  # a shell's status for a command stopped by Ctrl-C


# OSErrors of the user's paths; any other exception is a bug and keeps its traceback.
_PATH_ERRORS: dict[type[OSError], str] = {
    FileNotFoundError: "check the path",
    PermissionError: "choose a path you can write to, or change its permissions",
    NotADirectoryError: "a file is in the way of that folder; choose another path",
    FileExistsError: "a file is in the way of that folder; choose another path",
    IsADirectoryError: "expected a file, got a folder; pass the file's path",
}
EXPECTED = (*EXPECTED_ERRORS, *_PATH_ERRORS)


def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None,
            on_interrupt: str = "") -> None:
    """Run a script's ``main``; an expected error becomes ``error: <message>`` and exit 2, Ctrl-C
    the line ``interrupted`` (with ``on_interrupt``, what a rerun does) and exit 130."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted" + (f"; {on_interrupt}" if on_interrupt else ""), file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPT) from None
    except EXPECTED as err:
        if debug:
            raise
        print(f"error: {describe(err)}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def describe(err: BaseException) -> str:
    """The one-line message: the project's own text, or for an OSError raised by Python
    itself (``[Errno 13] Permission denied: 'x'``) the path, the reason and what to do."""
    if isinstance(err, OSError) and err.filename is not None:
        fix = next((text for kind, text in _PATH_ERRORS.items() if isinstance(err, kind)), "check the path")
        if isinstance(err, PermissionError) and _unreadable(err.filename):  # an input, not an output
            fix = "change its permissions so that you can read it, or copy it somewhere you can"
        return f"{err.filename}: {(err.strerror or str(err)).lower()}; {fix}."
    text = str(err)
    if "\nOriginal Traceback" in text:  # raised again by a DataLoader worker: its own message is the last line
        last = text.rstrip().splitlines()[-1]  # "errors.DatasetError: <message>"
        text = last.split(": ", 1)[-1]
    return " ".join(text.split())


def _unreadable(path: Any) -> bool:
    """Whether ``path`` exists but this user may not read it (a file) or list it (a folder)."""
    try:
        return os.path.exists(path) and not os.access(path, os.R_OK)
    except (TypeError, ValueError):  # a file descriptor or an odd name: no advice either way
        return False
