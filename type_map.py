"""A cell-type map (``--type_map W``): a small head on the finest pyramid level predicts, for every
pixel, background or one of the cell classes, trained on every pixel of every cell, and each RoI's
class probabilities are re-weighed by the map's classes inside its box.

Why: on four-class data the detector finds the rare cells but names them wrongly (the
``+trueclass`` rows of benchmarks/RESULTS.md). The box classifier learns from a few hundred
sampled RoIs per image; a dense map learns from every pixel of every cell, the way HoVer-Net's
type branch classifies nuclei and HTC's semantic branch adds context to Mask R-CNN. The map
changes no box and no mask: it re-divides each RoI's foreground probability between the
classes, by the normalised geometric mean ``p_box ** (1 - W) * p_map ** W`` (W = 0: the box
classifier alone, 1: the map alone).

Training builds the per-pixel target from the packed ground-truth masks on the device (one
scatter for the batch, no [cells, H, W] tensor, no host sync); prediction pools the map's
probabilities in each RoI's box with one ``roi_align`` for the batch.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from devices import to_device
from masks import PackedMasks

# The transform pads every batch to a multiple of this (torchvision's GeneralizedRCNNTransform default).
SIZE_DIVISIBLE = 32


class TypeMapHead(nn.Module):
    """Per-pixel class logits [B, classes, h, w] (background first) from the finest FPN level."""

    def __init__(self, in_channels: int = 256, num_classes: int = 5, width: int = 128, weight: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [nn.Conv2d(in_channels if i == 0 else width, width, 3, padding=1), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.logits = nn.Conv2d(width, num_classes, 1)
        self.weight = float(weight)  # W of the re-weighing at prediction (predictor.Settings.type_weight overrides it)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        nn.init.normal_(self.logits.weight, std=0.01)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return self.logits(self.convs(finest(features)))


def finest(features: dict[str, Tensor]) -> Tensor:
    """The highest-resolution pyramid level (FPN's first)."""
    return next(iter(features.values()))


def level_stride(feature: Tensor, image_shapes: list[tuple[int, int]]) -> int:
    """Input pixels per cell of the level: the batch is padded to a multiple of ``SIZE_DIVISIBLE``
    (torchvision's transform), so its padded height over the level's is exact whatever the
    image sizes (the unpadded height misleads on images of a few dozen pixels)."""
    padded = math.ceil(max(h for h, _ in image_shapes) / SIZE_DIVISIBLE) * SIZE_DIVISIBLE
    return max(1, round(padded / feature.shape[-2]))


def type_targets(targets: list[dict[str, Tensor]], size: tuple[int, int], stride: int) -> Tensor:
    """Each pixel's class [B, h, w] on the level's grid (``size``): the label of the cell covering
    input pixel (``stride`` i, ``stride`` j), where ``roi_align`` reads cell (i, j), 0 for background. Painted
    from the packed masks in one scatter for the batch; pixel coordinates come from the boxes
    and offsets, which live on the host."""
    height, width = size[0] * stride, size[1] * stride
    device = targets[0]["labels"].device
    canvas = torch.zeros(len(targets) * height * width, dtype=torch.int64, device=device)
    places, values = [], []
    for b, target in enumerate(targets):  # per image, not per cell
        masks = target["masks"]
        if len(masks) == 0:
            continue
        if not isinstance(masks, PackedMasks):  # torchvision's [N, H, W] masks: the map from them directly
            labels = target["labels"].to(device=device, dtype=torch.uint8)[:, None, None]
            full = torch.where(masks > 0, labels, 0).amax(dim=0).long()  # masks' own size and dtype, then one map
            rows = torch.arange(full.shape[0], device=device)[:, None]
            cols = torch.arange(full.shape[1], device=device)[None, :]
            places.append(((b * height + rows) * width + cols).flatten())
            values.append(full.flatten())
            continue
        x1, y1, x2, y2 = masks.boxes.numpy().T
        areas = (x2 - x1) * (y2 - y1)
        owner = np.repeat(np.arange(len(areas)), areas)
        within = np.arange(int(areas.sum())) - np.repeat(masks.offsets.numpy()[:-1], areas)
        widths = (x2 - x1)[owner]
        rows, cols = y1[owner] + within // widths, x1[owner] + within % widths
        places.append(to_device((b * height + rows) * width + cols, device))
        values.append(torch.where(masks.data > 0, target["labels"].to(device)[to_device(owner, device)], 0))
    if places:
        canvas.scatter_reduce_(0, torch.cat(places), torch.cat(values), reduce="amax")
    return canvas.view(len(targets), height, width)[:, ::stride, ::stride]


def type_loss(logits: Tensor, targets: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]]) -> Tensor:
    """Mean per-pixel cross-entropy of the map against ``type_targets`` on the level's grid."""
    truth = type_targets(targets, tuple(logits.shape[-2:]), level_stride(logits, image_shapes))
    return F.cross_entropy(logits.float(), truth)


def rescore(probs: Tensor, logits: Tensor, boxes: list[Tensor], image_shapes: list[tuple[int, int]],
            weight: float) -> Tensor:
    """Class probabilities [R, classes] of the RoIs ``boxes`` (each image's) with their foreground
    re-divided: the box classifier's shares times the map's, to the powers ``1 - weight`` and
    ``weight``, normalised; the background probability is kept."""
    if weight <= 0 or probs.shape[0] == 0:  # shapes and a host number: no read
        return probs
    maps = F.softmax(logits.float(), dim=1)
    pooled = roi_align(maps, [b.float() for b in boxes], (7, 7), 1.0 / level_stride(logits, image_shapes),
                       sampling_ratio=2)  # roi_align numbers each image's boxes itself
    mass = pooled[:, 1:].sum(dim=(2, 3))
    shares = mass / mass.sum(dim=1, keepdim=True).clamp(min=1e-12)
    foreground = probs[:, 1:].float()
    total = foreground.sum(dim=1, keepdim=True)
    mixed = (foreground / total.clamp(min=1e-12)).clamp(min=1e-12) ** (1 - weight) * shares.clamp(min=1e-12) ** weight
    mixed = mixed / mixed.sum(dim=1, keepdim=True) * total
    return torch.cat([probs[:, :1], mixed.to(probs.dtype)], dim=1)
