"""Train Mask R-CNN with a ResNet-101-FPN backbone on cells in the training layout
(<sample>/image.tif + class1..4.tif, one instance id per cell).

Example: python train_resnet.py --train_dir dataset/train --use_cosine
"""
from __future__ import annotations

from typing import Any, Sequence

import training
from cli import run_cli


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return training.main(argv, backbone="resnet101", description=__doc__)


if __name__ == "__main__":
    run_cli(main)
