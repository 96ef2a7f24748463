"""A shallow ResNet in place of ResNet-101, for tests of the training loop, resuming, faults
and prediction paths, where the depth of the backbone is not what is tested.

Mask R-CNN's CPU step time is dominated by the weights (weight gradients and the AdamW update
of 63 M parameters), not by the tiny test images, so one Bottleneck block per stage instead of
3/4/23/3 makes those tests several times faster. Same stage widths (256..2048 channels), same
state-dict layout per block, so checkpoints written under the patch reload under it.

In-process: ``with shallow_resnet(): ...`` or the ``shallow`` fixture of conftest.py.
A subprocess: ``python tests/shallow.py train_resnet.py <flags>`` (torchrun: the same path);
a benchmark's worker processes: its ``--launcher tests/shallow.py``.
"""
from __future__ import annotations

import runpy
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from torchvision.models.resnet import Bottleneck, ResNet

ROOT = Path(__file__).resolve().parents[1]


def shallow_resnet101(weights: Any = None, **kwargs: Any) -> ResNet:
    """Called like torchvision's ``resnet101`` by model._resnet_fpn (weights are never loaded)."""
    return ResNet(Bottleneck, [1, 1, 1, 1], **kwargs)


@contextmanager
def shallow_resnet() -> Iterator[None]:
    import model

    real = model.resnet101
    model.resnet101 = shallow_resnet101
    try:
        yield
    finally:
        model.resnet101 = real


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    script = str(ROOT / sys.argv[1])
    sys.argv = [script, *sys.argv[2:]]
    with shallow_resnet():
        runpy.run_path(script, run_name="__main__")
