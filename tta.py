"""Test-time augmentation views: flips and scales of an image or a tile, and the way back.

A view is predicted like any image; its boxes and 28x28 mask probabilities are mapped back to
the unflipped, unscaled frame here, and ``predictor.predict_images`` merges the views of an
image with its tiles (``merging.select_candidates``, ``merging.greedy_mask_merge``), so a cell
seen in several views is kept once.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from devices import scale_boxes

FLIPS = ((False, False), (True, False), (False, True), (True, True))  # (horizontal, vertical)


class View(NamedTuple):
    """How one forward pass sees an image: a scale, a flip and a quarter turn of it."""

    hflip: bool = False
    vflip: bool = False
    scale: float = 1.0
    rot90: bool = False


def views(scales: Sequence[float] | None, dihedral: bool = False) -> list[View]:
    """The 4 flips at each scale, and with ``dihedral`` each also turned by 90 degrees (the 8
    symmetries of a square); ``None`` is the one plain view."""
    if not scales:
        return [View()]
    turns = (False, True) if dihedral else (False,)
    return [View(h, v, float(s), r) for s in scales for r in turns for h, v in FLIPS]


def apply_view(image: torch.Tensor, view: View) -> torch.Tensor:
    """The image as the view shows it: scaled, flipped, then turned a quarter counter-clockwise."""
    if view.scale != 1.0:
        image = F.interpolate(image[None], scale_factor=view.scale, mode="bilinear", align_corners=False,
                              recompute_scale_factor=True)[0]
    dims = [d for d, on in ((-1, view.hflip), (-2, view.vflip)) if on]
    image = image.flip(dims) if dims else image
    return image.rot90(1, dims=(-2, -1)) if view.rot90 else image


def boxes_back(boxes: torch.Tensor, view: View, view_size: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Boxes predicted on the view ([K, 4] in its pixels) in the frame of the unviewed image."""
    view_h, view_w = view_size
    if view.rot90:  # view point (x, y) is (view_h - y, x) of the unturned image, whose size is (view_w, view_h)
        boxes = torch.stack([view_h - boxes[:, 3], boxes[:, 0], view_h - boxes[:, 1], boxes[:, 2]], dim=1)
        view_h, view_w = view_w, view_h
    x1, y1, x2, y2 = boxes.unbind(dim=1)  # columns, not list indexing: that is a host-to-device copy
    if view.hflip:
        x1, x2 = view_w - x2, view_w - x1
    if view.vflip:
        y1, y2 = view_h - y2, view_h - y1
    boxes = torch.stack((x1, y1, x2, y2), dim=1)
    if view.scale != 1.0:
        boxes = scale_boxes(boxes, size[1] / view_w, size[0] / view_h)
    return boxes


def masks_back(masks: torch.Tensor, view: View) -> torch.Tensor:
    """28x28 box-relative mask probabilities ([K, 28, 28]) of a view, unturned and unflipped."""
    if view.rot90:
        masks = masks.rot90(-1, dims=(-2, -1))
    dims = [d for d, on in ((-1, view.hflip), (-2, view.vflip)) if on]
    return masks.flip(dims) if dims else masks
