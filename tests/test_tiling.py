"""Tiled prediction: a stub model that returns exactly the cells (or cell pieces) it sees."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dataloader import Instances
from synthetic import synth_image
from torchvision.ops import box_iou

from tiling import merge_detections, overlap_over_smaller, overlapping_boxes, predict_tiled, tile_grid


class CellOracle(torch.nn.Module):
    """Reads instance ids from channel 0 and returns every visible cell piece as an exact crop,
    as a perfect model would: cells cut by the tile edge come back cut."""

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        return [self._detect(img) for img in images]

    def _detect(self, tile: torch.Tensor) -> dict:
        ids = tile[0].numpy().astype(np.int64)
        boxes, labels, crops = [], [], []
        for value in np.unique(ids[ids > 0]):
            ys, xs = np.nonzero(ids == value)
            y0, x0 = ys.min(), xs.min()
            crop = ids[y0:ys.max() + 1, x0:xs.max() + 1] == value
            boxes.append([x0, y0, xs.max() + 1, ys.max() + 1])
            labels.append(int(value) % 4 + 1)
            crops.append((int(x0), int(y0), crop))
        n = len(boxes)
        return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
                "scores": torch.linspace(0.9, 0.5, n) if n else torch.zeros(0),
                "labels": torch.tensor(labels, dtype=torch.int64), "crops": crops,
                "image_size": tuple(tile.shape[-2:])}


def _scene(seed: int, size: tuple[int, int]) -> tuple[torch.Tensor, dict]:
    _, labels = synth_image(np.random.default_rng(seed), size, 40)
    ids = np.zeros(size, dtype=np.int64)
    for lab in labels.values():  # one id map; later classes win overlaps, like a painter
        ids[lab > 0] = lab[lab > 0]
    image = torch.zeros(3, *size)
    image[0] = torch.from_numpy(ids).float()
    return image, ids


def _as_set(crops: list, labels: list) -> set:
    return {(int(l), x, y, c.shape, c.tobytes()) for (x, y, c), l in zip(crops, labels)}


def test_grid_covers_image_with_overlap() -> None:
    windows = tile_grid(200, 260, 96, 0.4)
    covered = np.zeros((200, 260), bool)
    for y0, x0, y1, x1 in windows:
        assert y1 - y0 == 96 and x1 - x0 == 96
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    assert tile_grid(50, 60, 96, 0.25) == [(0, 0, 50, 60)]
    with pytest.raises(ValueError):
        tile_grid(10, 10, 5, 1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiles_give_the_same_instances_as_the_whole_image(seed: int) -> None:
    image, ids = _scene(seed, (200, 260))
    oracle = CellOracle()
    whole = oracle([image])[0]
    tiled = predict_tiled(oracle, image, tile=96, overlap=0.4, batch_size=3)
    assert len(tile_grid(200, 260, 96, 0.4)) > 4  # cells really are cut by inner tile edges
    assert _as_set(tiled["crops"], tiled["labels"].tolist()) == _as_set(whole["crops"], whole["labels"].tolist())
    assert len(tiled["crops"]) == len(whole["crops"])
    assert tiled["image_size"] == (200, 260)


def test_overlap_over_smaller_and_duplicate_removal() -> None:
    big = (10, 10, np.ones((6, 6), bool))
    piece = (13, 10, np.ones((6, 3), bool))
    assert overlap_over_smaller(big, piece) == 1.0
    assert overlap_over_smaller(big, (40, 40, np.ones((2, 2), bool))) == 0.0
    part = {"boxes": torch.tensor([[10., 10, 16, 16], [13, 10, 16, 16]]), "scores": torch.tensor([0.5, 0.9]),
            "labels": torch.tensor([1, 1]), "cut": torch.tensor([False, True]), "crops": [big, piece]}
    merged = merge_detections([part], (50, 50))
    assert merged["scores"].tolist() == [0.5] and merged["crops"][0] is big


def test_overlapping_boxes_match_the_dense_definition_across_chunks() -> None:
    generator = torch.Generator().manual_seed(0)
    corner = torch.rand(300, 2, generator=generator) * 200
    boxes = torch.cat([corner, corner + 1 + torch.rand(300, 2, generator=generator) * 40], dim=1)
    dense = box_iou(boxes, boxes) > 0
    neighbours = overlapping_boxes(boxes, chunk=64)  # several chunks, the last one partial
    assert len(neighbours) == len(boxes)
    for i, near in enumerate(neighbours):
        assert near.tolist() == dense[i].nonzero().flatten().tolist(), i
    assert overlapping_boxes(torch.zeros((0, 4))) == []
