"""Cascade R-CNN box stages (Cai & Vasconcelos, CVPR 2018, "Cascade R-CNN"), ``--cascade``.

The Mask R-CNN box head is trained on RoIs matched at IoU 0.5, so its score and its boxes are
tuned to boxes of that quality. A cascade adds stages trained at stricter IoUs (0.6, 0.7), each
on the previous stage's refined boxes. The detection score becomes the mean of the stages'
class probabilities, each read on its own stage's input boxes, and is quality-aware; the boxes
(and so the masks, which the mask head computes inside them) come from the last stage.

The first stage is the model's own box head, unchanged, so a checkpoint without the cascade
keeps its weights; the added stages regress one box per RoI (class-agnostic), as Cascade R-CNN
does, and start from their own initialisation. Training follows detectron2's layout: later
stages take every RoI the first stage sampled, relabelled at their own threshold without new
sampling or added ground truth, and each stage passes a third of its gradient back into the
shared features. The RoI heads (``detector.LeanRoIHeads``) call ``losses`` and ``refine``; this
file adds no host sync of its own, and each stage's RoI pooling reads its level counts once.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.ops import boxes as box_ops

from detector import Fp32BoxCoder, SlicedMatcher, scale_gradient, weighted_fastrcnn_loss

# The stages after the model's own box head (trained at IoU 0.5 with box-coder weights 10, 10,
# 5, 5): the IoU at which each labels its RoIs positive, and its box-coder weights (the deltas
# of better boxes are smaller, so each stage scales them up further).
STAGE_IOUS = (0.6, 0.7)
STAGE_WEIGHTS = ((20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
# Smallest side (px) of a refined box that a later stage trains on (the detections' own floor).
MIN_SIDE = 1e-2


class CascadeStage(nn.Module):
    """One refinement stage: its own two-layer box head, a classifier and one box per RoI."""

    def __init__(self, in_features: int, num_classes: int, iou: float, weights: tuple[float, ...],
                 representation: int = 1024) -> None:
        super().__init__()
        self.box_head = TwoMLPHead(in_features, representation)
        self.cls_score = nn.Linear(representation, num_classes)
        self.bbox_pred = nn.Linear(representation, 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)
        self.box_coder = Fp32BoxCoder(weights)
        self.matcher = SlicedMatcher(Matcher(iou, iou, allow_low_quality_matches=False))

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """Class logits [R, classes] and box deltas [R, 4] of pooled RoI features."""
        features = self.box_head(pooled)
        return self.cls_score(features), self.bbox_pred(features)


class CascadeHeads(nn.Module):
    """The stages after the first; ``model.roi_heads.cascade`` holds them (``model.build_model``)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList(CascadeStage(in_features, num_classes, iou, weights)
                                    for iou, weights in zip(STAGE_IOUS, STAGE_WEIGHTS))

    @property
    def gradient_share(self) -> float:
        """Each stage's share of the gradient into the shared features (the stages count the first)."""
        return 1.0 / (len(self.stages) + 1)

    def losses(self, heads: Any, features: dict[str, Tensor], proposals: list[Tensor],
               image_shapes: list[tuple[int, int]], targets: list[dict[str, Tensor]], class_logits: Tensor,
               box_regression: Tensor, labels: list[Tensor], weights: list[Tensor]) -> Tensor:
        """The later stages' classification and box losses, summed: each stage relabels the
        previous stage's refined boxes of the first stage's sampled RoIs (``weights``: those
        that count) at its own IoU and is trained on them."""
        counts = [len(p) for p in proposals]
        first = torch.cat(labels)
        # A positive RoI is refined by the box of its true class, the others by their likeliest class's.
        classes = torch.where(first > 0, first, class_logits.detach()[:, 1:].argmax(dim=1) + 1)
        boxes = first_stage_boxes(heads, box_regression.detach(), proposals, classes, image_shapes)
        gt_boxes = [t["boxes"].to(boxes.dtype) for t in targets]
        total = class_logits.new_zeros((), dtype=torch.float32)
        for stage in self.stages:
            inputs = list(boxes.split(counts))
            matched, stage_labels = heads.assign_targets_to_proposals(inputs, gt_boxes, [t["labels"] for t in targets],
                                                                      stage.matcher)
            picked = [(g if g.numel() else g.new_zeros((1, 4)))[m] for g, m in zip(gt_boxes, matched)]
            # A box refined out of the image is clipped to no area: it does not count, and its
            # regression target (a division by its zero side) is replaced before it meets a gradient.
            kept = ((boxes[:, 2:] - boxes[:, :2]) > MIN_SIDE).all(dim=1)
            regression_targets = torch.where(kept[:, None], torch.cat(stage.box_coder.encode(picked, inputs)), 0.0)
            stage_weights = [w & k for w, k in zip(weights, kept.split(counts))]
            logits, deltas = stage(scale_gradient(heads.box_roi_pool(features, inputs, image_shapes),
                                                  self.gradient_share))
            classification, box = weighted_fastrcnn_loss(logits, deltas, stage_labels, [regression_targets],
                                                         stage_weights, heads.class_weights)
            total = total + classification + box
            boxes = clip_per_image(decode(stage.box_coder, deltas.detach(), boxes), counts, image_shapes)
        return total

    def refine(self, heads: Any, features: dict[str, Tensor], proposals: list[Tensor],
               image_shapes: list[tuple[int, int]], class_logits: Tensor,
               box_regression: Tensor) -> tuple[Tensor, Tensor]:
        """Prediction: the stages' mean class probabilities [R, classes] and the last stage's
        boxes [R, 4], for the first stage's outputs on ``proposals``."""
        counts = [len(p) for p in proposals]
        probs = F.softmax(class_logits.float(), -1)
        classes = probs[:, 1:].argmax(dim=1) + 1
        boxes = first_stage_boxes(heads, box_regression, proposals, classes, image_shapes)
        total = probs
        for stage in self.stages:
            logits, deltas = stage(heads.box_roi_pool(features, list(boxes.split(counts)), image_shapes))
            total = total + F.softmax(logits.float(), -1)
            boxes = clip_per_image(decode(stage.box_coder, deltas, boxes), counts, image_shapes)
        return total / (len(self.stages) + 1), boxes


def first_stage_boxes(heads: Any, box_regression: Tensor, proposals: list[Tensor], classes: Tensor,
                      image_shapes: list[tuple[int, int]]) -> Tensor:
    """The first (class-specific) stage's box of each RoI's class ``classes`` [R], clipped."""
    decoded = heads.box_coder.decode(box_regression, proposals)  # [R, classes, 4]
    boxes = decoded[torch.arange(len(classes), device=classes.device), classes]
    return clip_per_image(boxes, [len(p) for p in proposals], image_shapes)


def decode(coder: Fp32BoxCoder, deltas: Tensor, boxes: Tensor) -> Tensor:
    """Boxes [R, 4] from one delta per RoI, in float32 (the deltas are fp16 under autocast)."""
    with torch.autocast(deltas.device.type, enabled=False):
        return coder.decode_single(deltas.float(), boxes.float())


def clip_per_image(boxes: Tensor, counts: list[int], image_shapes: list[tuple[int, int]]) -> Tensor:
    """Boxes [R, 4] of the images in order (``counts`` each) clipped to their image."""
    return torch.cat([box_ops.clip_boxes_to_image(b, shape) for b, shape in zip(boxes.split(counts), image_shapes)])

