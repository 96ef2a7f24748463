"""Train Mask R-CNN with an EfficientNetV2-M-FPN backbone on the HW3 cell dataset.

Example: python train_effnet_v2.py --train_dir dataset/train --use_cosine
"""
from __future__ import annotations

from typing import Any, Sequence

import engine
from cli import run_cli


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return engine.main(argv, backbone="effnet_v2_m", description=__doc__)


if __name__ == "__main__":
    run_cli(main)
