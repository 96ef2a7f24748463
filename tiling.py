"""Tiled prediction, merged across tile borders.

Large images are cut into overlapping tiles the size of a training crop, so cells look as
they did in training (the model's transform scales each tile like a crop); each tile is
predicted on its own, detections are moved back to image coordinates, and the merge keeps
every cell once: a detection cut by an inner tile border loses to the whole copy of the same
cell from a neighbouring tile, and duplicates from overlaps are removed by mask overlap.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from coco import mask_crops

Crop = tuple[int, int, np.ndarray]  # x0, y0, boolean mask inside its box


def tile_grid(height: int, width: int, tile: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """(y0, x0, y1, x1) windows of side ``tile`` covering the image, the last ones flush with
    the border; an image no larger than a tile is one window."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"--tile_overlap must be in [0, 1), got {overlap}")
    ys = _starts(height, tile, overlap)
    xs = _starts(width, tile, overlap)
    return [(y, x, min(y + tile, height), min(x + tile, width)) for y in ys for x in xs]


@torch.no_grad()
def predict_tiled(model: nn.Module, image: torch.Tensor, tile: int, overlap: float, batch_size: int = 4,
                  mask_thresh: float = 0.5, match_thresh: float = 0.5) -> dict:
    """One image's detections as ``{boxes, scores, labels, crops, image_size}``.

    ``model`` must return unpasted masks (its transform's ``paste_masks`` set to False), as
    ``engine.predict`` arranges.
    """
    height, width = image.shape[-2:]
    windows = tile_grid(height, width, tile, overlap)
    parts = []
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        outputs = model([image[:, y0:y1, x0:x1] for y0, x0, y1, x1 in chunk])
        for (y0, x0, y1, x1), out in zip(chunk, outputs):
            parts.append(_to_image_coords(out, (y0, x0, y1, x1), (height, width), mask_thresh))
    return merge_detections(parts, (height, width), match_thresh)


def merge_detections(parts: list[dict], image_size: tuple[int, int], match_thresh: float = 0.5) -> dict:
    """Greedy merge: whole detections before cut ones, by score; a detection whose mask
    lies mostly (intersection over the smaller mask > ``match_thresh``) inside a kept one of
    the same class is a duplicate."""
    boxes = torch.cat([p["boxes"] for p in parts]) if parts else torch.zeros((0, 4))
    scores = torch.cat([p["scores"] for p in parts]) if parts else torch.zeros(0)
    labels = torch.cat([p["labels"] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
    cut = torch.cat([p["cut"] for p in parts]) if parts else torch.zeros(0, dtype=torch.bool)
    crops = [c for p in parts for c in p["crops"]]
    # Possibly cut detections go last, the largest first: that copy contains the most of its cell.
    order = sorted(range(len(scores)), key=lambda i: (1, -int(crops[i][2].sum())) if cut[i] else (0, -float(scores[i])))
    neighbours = overlapping_boxes(boxes)
    kept: list[int] = []
    is_kept = torch.zeros(len(scores), dtype=torch.bool)
    for i in order:  # rivals found in one vectorised step: views x 1000 detections make n^2 Python too slow
        near = neighbours[i]
        rivals = near[is_kept[near] & (labels[near] == labels[i])].tolist()
        if not any(overlap_over_smaller(crops[i], crops[k]) > match_thresh for k in rivals):
            kept.append(i)
            is_kept[i] = True
    kept.sort(key=lambda i: -float(scores[i]))
    index = torch.tensor(kept, dtype=torch.int64)
    return {"boxes": boxes[index], "scores": scores[index], "labels": labels[index],
            "crops": [crops[i] for i in kept], "image_size": image_size}


def overlapping_boxes(boxes: torch.Tensor, chunk: int = 1024) -> list[torch.Tensor]:
    """For each box, the indices of the boxes it overlaps, computed ``chunk`` rows at a time.
    Tiles x flips x 1000 detections reach tens of thousands of boxes on a large image, where
    a dense N x N overlap matrix (and box_iou's N x N x 2 temporaries) takes tens of GB."""
    neighbours: list[torch.Tensor] = []
    for start in range(0, len(boxes), chunk):
        rows = boxes[start:start + chunk, None]
        hit = ((rows[..., 0] < boxes[:, 2]) & (boxes[:, 0] < rows[..., 2])
               & (rows[..., 1] < boxes[:, 3]) & (boxes[:, 1] < rows[..., 3]))
        row, col = hit.nonzero(as_tuple=True)
        neighbours.extend(col.split(torch.bincount(row, minlength=len(hit)).tolist()))
    return neighbours


def overlap_over_smaller(a: Crop, b: Crop) -> float:
    """|A ∩ B| / min(|A|, |B|): a cut piece of a cell scores 1 against the whole cell."""
    ax, ay, am = a
    bx, by, bm = b
    x0, y0 = max(ax, bx), max(ay, by)
    x1, y1 = min(ax + am.shape[1], bx + bm.shape[1]), min(ay + am.shape[0], by + bm.shape[0])
    smaller = min(int(am.sum()), int(bm.sum()))
    if x1 <= x0 or y1 <= y0 or smaller == 0:
        return 0.0
    inter = np.logical_and(am[y0 - ay:y1 - ay, x0 - ax:x1 - ax], bm[y0 - by:y1 - by, x0 - bx:x1 - bx]).sum()
    return float(inter) / smaller


def _to_image_coords(out: dict, window: tuple[int, int, int, int], image_size: tuple[int, int],
                     mask_thresh: float) -> dict:
    y0, x0, y1, x1 = window
    crops = out["crops"] if "crops" in out else mask_crops(out["masks"], out["boxes"], out["image_size"], mask_thresh)
    boxes = out["boxes"].detach().float().cpu() + torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
    # A box touching a tile edge that is not an image edge may be a cut cell.
    inner = torch.tensor([x0 > 0, y0 > 0, x1 < image_size[1], y1 < image_size[0]])
    edge = torch.tensor([x0, y0, x1, y1], dtype=torch.float32)
    touches = (boxes - edge).abs() <= 1.0
    return {"boxes": boxes, "scores": out["scores"].detach().float().cpu(),
            "labels": out["labels"].detach().cpu(), "cut": (touches & inner).any(dim=1),
            "crops": [(cx + x0, cy + y0, crop) for cx, cy, crop in crops]}


def _starts(length: int, tile: int, overlap: float) -> list[int]:
    if length <= tile:
        return [0]
    stride = max(int(tile * (1.0 - overlap)), 1)
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]
