"""Test-time augmentation: flips and scales, merged so duplicates do not lower AP.

Each view is predicted, mapped back to the original image, turned into mask crops, and the
views are merged by a per-class greedy mask NMS (``tiling.merge_detections``): a cell seen in
several views is kept once, with its best score.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from coco import mask_crops
from tiling import merge_detections

FLIPS = ((False, False), (True, False), (False, True), (True, True))  # (horizontal, vertical)


class TTAModel(nn.Module):
    """Wraps a Mask R-CNN whose transform does not paste masks; returns, per image,
    ``{boxes, scores, labels, crops, image_size}`` like ``tiling.predict_tiled`` so the two
    compose (tiles of TTA predictions)."""

    def __init__(self, model: nn.Module, scales: Sequence[float] = (1.0,), flips: bool = True,
                 match_thresh: float = 0.5, mask_thresh: float = 0.5) -> None:
        super().__init__()
        self.model = model
        self.scales = tuple(scales)
        self.flips = FLIPS if flips else FLIPS[:1]
        self.match_thresh = match_thresh
        self.mask_thresh = mask_thresh

    @torch.no_grad()
    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        return [self._predict(image) for image in images]

    def _predict(self, image: torch.Tensor) -> dict:
        height, width = image.shape[-2:]
        parts = []
        for scale in self.scales:
            scaled = image if scale == 1.0 else F.interpolate(
                image[None], scale_factor=scale, mode="bilinear", align_corners=False, recompute_scale_factor=True)[0]
            for hflip, vflip in self.flips:
                view = _flip(scaled, hflip, vflip)
                out = self.model([view])[0]
                parts.append(self._back_to_image(out, scaled.shape[-2:], (height, width), hflip, vflip))
        return merge_detections(parts, (height, width), self.match_thresh)

    def _back_to_image(self, out: dict, view_size: tuple[int, int], size: tuple[int, int],
                       hflip: bool, vflip: bool) -> dict:
        boxes = out["boxes"].detach().float().cpu().clone()
        masks = out["masks"].detach().float().cpu()
        view_h, view_w = view_size
        if hflip:
            boxes[:, [0, 2]] = view_w - boxes[:, [2, 0]]
            masks = masks.flip(-1)
        if vflip:
            boxes[:, [1, 3]] = view_h - boxes[:, [3, 1]]
            masks = masks.flip(-2)
        boxes *= torch.tensor([size[1] / view_w, size[0] / view_h] * 2)
        return {"boxes": boxes, "scores": out["scores"].detach().float().cpu(), "labels": out["labels"].detach().cpu(),
                "cut": torch.zeros(len(boxes), dtype=torch.bool),
                "crops": mask_crops(masks, boxes, size, self.mask_thresh)}


def _flip(image: torch.Tensor, hflip: bool, vflip: bool) -> torch.Tensor:
    dims = [d for d, on in ((-1, hflip), (-2, vflip)) if on]
    return image.flip(dims) if dims else image
