"""The ``history.json`` contract: one row per epoch that training writes and ``plot_curve.py``
reads. Standard library only, so the plotting tool starts without the model stack.
"""
from __future__ import annotations

import json
from pathlib import Path

from files import write_json

HISTORY_FILE = "history.json"
# The curves ``plot_curve.py`` draws from it beside it, by plot: a fresh run sets them aside with it.
CURVE_FILES = {"loss": "loss_curve.png", "metrics": "map_curve.png", "lr": "lr_curve.png"}
# The Mask R-CNN loss terms, each a column of every row (the summed ``loss`` beside them).
LOSS_KEYS = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
# Every term a history row logs: torchvision's, the Mask Scoring head's, the later cascade
# stages' and the cell-type map's (each 0 for a model without it).
LOGGED_LOSSES = (*LOSS_KEYS, "loss_mask_iou", "loss_cascade", "loss_types")


def write_history(path: Path, history: list[dict]) -> None:
    """history.json, strict JSON (NaN for a class absent from validation becomes null: ``write_json``)."""
    write_json(path, history, indent=1)


def recorded_epochs(output_dir: Path) -> int:
    """How many epochs a run folder's ``history.json`` records (0 where it has none or cannot be
    read): ``--resume`` of an earlier checkpoint into that folder would overwrite the later ones."""
    try:
        history = json.loads((Path(output_dir) / HISTORY_FILE).read_text())
    except (OSError, ValueError):
        return 0
    epochs = [row.get("epoch") for row in history if isinstance(row, dict)] if isinstance(history, list) else []
    return max((e for e in epochs if isinstance(e, int)), default=0)
