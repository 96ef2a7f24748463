"""argparse types that range-check a value when it is read, so a bad one stops with argparse's
one-line error and exit status 2 before any work, and the help formatter every script uses.
Standard library only: the data layer (``augment.py``) and the light tools (``evaluate.py``,
``check_stats.py``) use them without loading the model stack.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable


def checked(kind: Callable[[str], Any], test: Callable[[Any], bool], need: str) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)``, refused with "must be <need>" where ``test`` fails."""
    def parse(text: str) -> Any:
        value = kind(text)
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {need}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse


positive_int = checked(int, lambda v: v >= 1, "at least 1")
non_negative_int = checked(int, lambda v: v >= 0, "0 or more")
non_negative = checked(float, lambda v: v >= 0.0, "0 or more")
share = checked(float, lambda v: 0.0 <= v < 1.0, "in [0, 1)")  # a share of a tile, of samples, a decay
probability = checked(float, lambda v: 0.0 < v < 1.0, "between 0 and 1 (exclusive)")
positive = checked(float, lambda v: v > 0.0, "above 0")
chance = checked(float, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")  # how often an augmentation is applied
overlap = checked(float, lambda v: 0.0 < v <= 1.0, "in (0, 1]")  # an IoU a match needs


LABEL_RULES = ("evidence", "score")  # which predicted cells count: coco.scored_cells, or each detection alone
LABEL_THRESH = 0.5  # the score a cell needs to be written (inference.py) and counted found (evaluate.py)


def add_label_rule_arg(parser: argparse.ArgumentParser | Any, lead: str, thresh_flag: str, tail: str = "") -> None:
    """``--label_rule``, as inference.py keeps cells and evaluate.py counts them found: one
    declaration, so the F1 evaluate.py reports is that of the cells inference.py writes. Its
    default is None (read by ``by_evidence``), so a script can tell a rule given from none."""
    parser.add_argument("--label_rule", choices=LABEL_RULES, default=None,
                        help=f"{lead} evidence (the default): each cell whose class evidence (over the classes, "
                             "the sum of each class's best score among the detections lying at least half on the "
                             f"cell, at most 1) reaches {thresh_flag}, under its best class, with that sum as its "
                             f"score{tail}; score: each detection whose own class score reaches it")


def by_evidence(rule: str | None) -> bool:
    """Whether ``--label_rule`` (None where not given) keeps cells by their summed class evidence."""
    return rule != "score"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and each flag's default after its help, unless the help
    already says what happens by default or there is no default to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # identity, not ==: a default of 0 (== False) is a value to show, not an unset switch
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS \
                or "default" in text:
            return text
        return super()._get_help_string(action)
