"""Shared fixtures: the repo root on sys.path and small generated datasets in the real formats."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

from synthetic import make_dataset  # noqa: E402
from shallow import shallow_resnet  # noqa: E402


# A model that predicts a small image in a fraction of a second: few proposals, few detections.
TINY_PREDICTOR = {"backbone": "resnet101", "weights": "none", "min_size": 64, "max_size": 128, "input_scale": 0.0,
                  "detections_per_img": 20, "rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_test": 100}


MEMORY_DISK = Path("/dev/shm")
MEMORY_NEEDED = 6 * 2**30  # what the suite holds at once, with room to spare


def _has_room(folder: Path) -> bool:
    """A writable folder with MEMORY_NEEDED free, on a machine with that much memory available."""
    try:
        available = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemAvailable:"))
        return (folder.is_dir() and os.access(folder, os.W_OK) and shutil.disk_usage(folder).free >= MEMORY_NEEDED
                and available >= MEMORY_NEEDED)
    except (OSError, StopIteration, ValueError, IndexError):
        return False


def random_checkpoint(path: Path, seed: int = 0) -> Path:
    """A checkpoint file of a shallow ``TINY_PREDICTOR`` model with seeded random weights, for
    tests that run the prediction tools end to end."""
    from checkpoint import save_checkpoint
    from model import build_model

    torch.manual_seed(seed)
    with shallow_resnet():
        model = build_model(TINY_PREDICTOR, load_weights=False)
    save_checkpoint(path, {"model": model.state_dict(), "config": TINY_PREDICTOR, "args": {}})
    return path


@pytest.hookimpl(tryfirst=True)  # before pytest's own tmp_path factory is made
def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (pytest.ini's ``-n``), each worker gets its share of the cores, and so
    do the processes its tests start: more threads than cores make every test slower.

    Where a memory file system has room (Linux's /dev/shm, and that much memory available),
    temporary files go there: the suite writes ~20 GB of checkpoints, and on a slow disk
    writing them was half of a training test's time. Only the temporary root moves: pytest
    still numbers, locks and removes its own folders in it (``pytest-of-<user>``)."""
    if config.option.basetemp is None and _has_room(MEMORY_DISK):
        os.environ["TMPDIR"] = str(MEMORY_DISK)  # tempfile's root here and in every process tests start
        tempfile.tempdir = None
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Six training samples and three test images, RGBA LZW + float64 labels."""
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=6, n_test=3, size=(96, 112), cells=(5, 10), seed=0)


@pytest.fixture
def shallow() -> None:
    """ResNet-101 replaced by one Bottleneck block per stage (tests/shallow.py) for this test."""
    with shallow_resnet():
        yield


def shared(*parts: str) -> Path:
    """A path under ../shared/data, or a clean skip where it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def mask_boxes(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes with exclusive max from masks [N, H, W], and which masks have any pixel: the
    oracle every box the pipeline produces is checked against."""
    masks = masks.bool()
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    nonempty = rows.any(dim=1)
    height, width = masks.shape[-2:]
    ys = torch.arange(height)
    xs = torch.arange(width)
    y1 = torch.where(rows, ys, height).min(dim=1).values
    y2 = torch.where(rows, ys, -1).max(dim=1).values + 1
    x1 = torch.where(cols, xs, width).min(dim=1).values
    x2 = torch.where(cols, xs, -1).max(dim=1).values + 1
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    boxes[~nonempty] = 0
    return boxes, nonempty


def predicted_through_cli(checkpoint: Path, image: torch.Tensor, tmp_path: Path) -> list[dict]:
    """The submission ``inference.py --checkpoint`` writes, without any other flag, for one
    image [3, H, W] in [0, 1] saved as a PNG: what a user gets from a saved model."""
    import json

    import numpy as np
    from PIL import Image

    import inference

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(folder / "one.png")
    submission = inference.main(["--checkpoint", str(checkpoint), "--test_dir", str(folder),
                                 "--output_dir", str(tmp_path / "out"), "--num_workers", "0"])
    return json.loads(Path(submission).read_text())


def assert_cli_predicts_like_the_model(model: Any, config: dict, tmp_path: Path) -> Path:
    """Saves ``model`` (eval mode) as ``tmp_path/best.pth`` with ``config`` and checks that
    ``inference.py`` with no flag other than the checkpoint finds what the model itself
    finds on a random image; returns the checkpoint, to check what it rebuilt."""
    from checkpoint import save_checkpoint
    from predictor import Settings, predict_images

    image = torch.rand(3, 80, 90, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = predict_images(model, [image], Settings())[0]
    save_checkpoint(tmp_path / "best.pth", {"model": model.state_dict(), "config": config, "args": {}})
    results = predicted_through_cli(tmp_path / "best.pth", image, tmp_path)
    assert len(results) == len(expected["scores"]) > 0
    assert abs(max(r["score"] for r in results) - expected["scores"][0].item()) <= 1e-2
    return tmp_path / "best.pth"
