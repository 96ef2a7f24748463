"""The project's expected errors: bad input a user fixes, never a bug. Each message is one
line, ``<file>: <what is wrong>; <how to fix it>``, and ``cli.run_cli`` prints it with exit
status 2. They live here, importing nothing, so a tool's ``--help`` loads no model stack.
"""
from __future__ import annotations


class UsageError(ValueError):
    """Flags or an input file the user has to change."""


class DatasetError(ValueError):
    """A data folder, image or id map that cannot be read as the layout requires."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used."""


class WeightsError(RuntimeError):
    """Pretrained weights that cannot be used (download, file)."""


class DeviceMemoryError(RuntimeError):
    """A training step that does not fit the device's memory: the fix is a flag (smaller images,
    fewer RoIs, AMP), so it is reported in one line like bad input."""


class DivergenceError(RuntimeError):
    """Training whose loss stays non-finite: the fix is a flag (a lower --lr, no --use_amp) or an
    image, so it is reported in one line; last.pth stays the last finished epoch, for --resume."""


EXPECTED_ERRORS = (UsageError, DatasetError, CheckpointError, WeightsError, DeviceMemoryError, DivergenceError)
