"""Tiles of large images: the windows a large image is cut into, each the size of a training
crop so cells look as they did in training, and which detections a window's inner edge cuts
(``merging.py`` prefers the whole copies of a cell from other tiles).
"""
from __future__ import annotations

import torch

Window = tuple[int, int, int, int]  # y0, x0, y1, x1


def tile_grid(height: int, width: int, tile: int, overlap: float) -> list[Window]:
    """(y0, x0, y1, x1) windows of side ``tile`` covering the image, the last ones flush with
    the border; an image no larger than a tile (or ``tile`` 0) is one window."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"--tile_overlap must be in [0, 1), got {overlap}")
    if tile <= 0:
        return [(0, 0, height, width)]
    ys = _starts(height, tile, overlap)
    xs = _starts(width, tile, overlap)
    return [(y, x, min(y + tile, height), min(x + tile, width)) for y in ys for x in xs]


def max_cover(windows: list[Window]) -> int:
    """The most windows any pixel lies in: how many copies of one cell the tiles can make
    (intervals overlap most at one of their starts)."""
    spans = [sorted({(w[0], w[2]) for w in windows}), sorted({(w[1], w[3]) for w in windows})]
    rows, cols = (max(sum(a <= s < b for a, b in axis) for s, _ in axis) for axis in spans)
    return rows * cols


def cut_flags(boxes: torch.Tensor, window: Window, image_size: tuple[int, int]) -> torch.Tensor:
    """Boxes (image coordinates) touching a window edge that is not an image edge: maybe cut cells."""
    y0, x0, y1, x1 = window
    cut = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    for side, (edge, inner) in enumerate(((x0, x0 > 0), (y0, y0 > 0), (x1, x1 < image_size[1]), (y1, y1 < image_size[0]))):
        if inner:  # a loop over the 4 window edges, with Python numbers: no host-to-device copy
            cut |= (boxes[:, side] - edge).abs() <= 1.0
    return cut


def tile_stride(tile: int, overlap: float) -> int:
    """How far apart neighbouring tiles start: every tile but the last starts on a multiple of it."""
    return max(int(tile * (1.0 - overlap)), 1)


def _starts(length: int, tile: int, overlap: float) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile_stride(tile, overlap)))
    return starts + [length - tile]
