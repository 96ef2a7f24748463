"""Mask Scoring (Huang et al., CVPR 2019, "Mask Scoring R-CNN"): a small head that predicts
how well each predicted mask overlaps its cell, so that a detection is ranked by class
probability x predicted mask IoU (``--mask_iou``) instead of by a classifier that never saw
the mask. The scorer counts only each class's best 100 detections per image, so on dense
images the order decides which cells count.

The head reads the RoI features the mask head reads (14 x 14) beside the predicted mask of
the RoI's class (28 x 28, max-pooled to 14 x 14): four 3 x 3 convolutions (the last with
stride 2), two fully connected layers and one IoU per class. It trains with an L2 loss
against the IoU of the binarised predicted mask with its whole cell, on the positive RoIs
the mask head trains on; the predicted mask is detached, so the mask head learns only from
its own loss. The target is the IoU the mask will score once pasted on the image: the cell
is read over the region the pasted mask's bins cover, and its part outside that region counts
in the union (as Huang et al. do, through the share of the cell inside the proposal). A box
around half a cell, its mask filling the box, scores about 0.5, not 1: the ranking the head
serves is of masks on the image, where that half is missing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MaskIoUHead(nn.Module):
    """Predicted IoU of each RoI's mask with its cell, one per class (the RoI's class is read)."""

    def __init__(self, in_channels: int = 256, num_classes: int = 5, width: int = 256, hidden: int = 1024,
                 size: int = 14) -> None:
        super().__init__()
        convs = []
        for i in range(4):
            convs += [nn.Conv2d(in_channels + 1 if i == 0 else width, width, 3, stride=2 if i == 3 else 1, padding=1),
                      nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*convs)
        side = (size + 1) // 2
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(width * side * side, hidden), nn.ReLU(inplace=True),
                                nn.Linear(hidden, hidden), nn.ReLU(inplace=True))
        self.iou = nn.Linear(hidden, num_classes)
        for layer in self.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        nn.init.normal_(self.iou.weight, std=0.01)

    def forward(self, features: Tensor, mask_logits: Tensor, labels: Tensor) -> Tensor:
        """IoU [R] of each RoI's mask (``mask_logits`` [R, 28, 28] of its class ``labels``)
        given its pooled features [R, C, 14, 14]."""
        mask = F.max_pool2d(mask_logits.detach().sigmoid()[:, None], kernel_size=2, stride=2)
        out = self.iou(self.fc(self.convs(torch.cat([features, mask.to(features.dtype)], dim=1))))
        return out[torch.arange(len(labels), device=labels.device), labels]


def mask_iou_targets(mask_logits: Tensor, mask_targets: Tensor, boxes: Tensor | None = None,
                     cell_areas: Tensor | None = None) -> Tensor:
    """IoU of each binarised predicted mask (logit > 0: probability > 0.5) with its cell, the
    target (> 0.5) in the RoI's M x M frame; 0 where both are empty.

    ``boxes`` [R, 4] (the image region each frame covers, in pixels: ``masks.paste_frames``) and
    ``cell_areas`` [R] (each RoI's whole cell, in pixels) count the cell's pixels outside the
    frame in the union: the cell covers ``cell_area * M * M / frame_area`` of the frame's units,
    at least what the frame shows of it. Without them the frame is taken to hold the whole cell."""
    predicted = mask_logits.detach() > 0
    truth = mask_targets > 0.5
    overlap = (predicted & truth).flatten(1).sum(dim=1).float()
    shown = truth.flatten(1).sum(dim=1).float()
    cell = shown
    if boxes is not None and cell_areas is not None:
        sides = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1.0)
        units = mask_targets.shape[-1] * mask_targets.shape[-2] / (sides[:, 0] * sides[:, 1])
        cell = torch.maximum(shown, cell_areas.to(units.dtype) * units)
    union = predicted.flatten(1).sum(dim=1).float() + cell - overlap
    return overlap / union.clamp(min=1.0)


def mask_iou_loss(predicted: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error over the positive RoIs (zero, with a graph, when there are none)."""
    if predicted.numel() == 0:  # a shape, not a read
        return predicted.sum() * 0
    return F.mse_loss(predicted.float(), targets)
