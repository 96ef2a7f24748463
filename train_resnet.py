"""Train Mask R-CNN with a ResNet-101-FPN backbone on the HW3 cell dataset.

Example: python train_resnet.py --train_dir dataset/train --use_cosine
"""
from __future__ import annotations

from typing import Any, Sequence

import engine
from cli import run_cli


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return engine.main(argv, backbone="resnet101", description=__doc__)


if __name__ == "__main__":
    run_cli(main)
