"""argparse types that range-check a value when it is read, so a bad one stops with argparse's
one-line error and exit status 2 before any work. Standard library only: the data layer
(``augment.py``) uses them without loading the model stack.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable


def _checked(kind: Callable[[str], Any], test: Callable[[Any], bool], need: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {need}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse


positive_int = _checked(int, lambda v: v >= 1, "at least 1")
non_negative_int = _checked(int, lambda v: v >= 0, "0 or more")
non_negative = _checked(float, lambda v: v >= 0.0, "0 or more")
share = _checked(float, lambda v: 0.0 <= v < 1.0, "in [0, 1)")  # a share of a tile, of samples, a decay
probability = _checked(float, lambda v: 0.0 < v < 1.0, "between 0 and 1 (exclusive)")
positive = _checked(float, lambda v: v > 0.0, "above 0")
chance = _checked(float, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")  # how often an augmentation is applied
