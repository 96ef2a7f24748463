"""torchvision's Mask R-CNN detector with its host syncs taken out: the same proposals,
detections and losses.

torchvision's RPN, RoI heads and multi-level RoI pooling call ``nonzero`` (``torch.where(mask)``),
boolean-mask indexing, ``unique`` and one ``nms`` per image and pyramid level: each makes the
host wait for the GPU queue, about 40 times per training step. Here proposals are filtered by
a few chunked NMS calls for the whole batch, the samplers draw random keys and ``topk`` with
the counts left on the device, the losses weight their samples instead of indexing them, and
each RoI pooling groups its RoIs by level with one read of the level counts. What is left per
step, whatever the batch and instance counts, is marked ``host sync`` below: one per NMS chunk,
the RPN's kept count per image, the positives count for the mask head, and one per RoI pooling.
Prediction uses the same RPN and pooling, and the box head's detections of a whole batch (tiles
and views) come from the same chunked NMS.

Under mixed precision, anchors and box decoding stay in float32 (``Fp32AnchorGenerator``,
``Fp32BoxCoder``): torchvision takes both from the features' dtype, and an fp16 (bf16)
coordinate near 1000 px is off by up to 0.5 (4) px before any delta is applied. Frozen
BatchNorm keeps its input's dtype (``FrozenBatchNorm2d``), where torchvision's promotes
fp16 activations back to float32 for the rest of the block.

Training also never holds a float copy of every ground-truth mask (``CellTransform`` skips the
resize at native scale, ``project_masks_on_boxes`` samples packed masks, ``SlicedMatcher``
matches anchors without the [cells, anchors] IoU matrix).

This file is the one home of every part that replaces torchvision's: ``use_cell_detector``
installs them on a built torchvision model (``model.build_model`` calls it), and
``use_torchvision_detector`` is its one inverse, for side-by-side benchmarks and equality
tests. Importing it changes nothing in torchvision.
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozenBatchNorm2d
from torchvision.ops import box_iou, nms, roi_align
from torchvision.ops import boxes as box_ops
from torchvision.ops.poolers import MultiScaleRoIAlign, _convert_to_roi_format, _filter_input, _setup_scales

from devices import counts as level_counts
from devices import scale_boxes
from mask_scoring import mask_iou_loss, mask_iou_targets
from masks import PackedMasks, mask_areas, paste_frames
from type_map import rescore, type_loss

# Boxes per NMS call: one host sync per call, and the IoU bit mask of a call grows with its square.
NMS_CHUNK = 8192
# Largest offset coordinate NMS takes in float32 (``nms_segments``): its spacing there is 1/256 px.
FLOAT32_OFFSETS = 2.0 ** 16


def use_cell_detector(model: MaskRCNN, config: dict[str, Any]) -> MaskRCNN:
    """Install this file's parts on a torchvision Mask R-CNN built by ``model.build_model``:
    the transform, the RPN, RoI heads and pooling without per-image host syncs, float32 box
    coders and the sliced anchor matching. The classes add methods only (no new state), so
    the built modules take them as they are, and the inverse swaps them back."""
    model.__class__ = CellMaskRCNN
    model.transform = CellTransform.from_config(config)
    model.rpn.__class__, model.roi_heads.__class__ = LeanRPN, LeanRoIHeads
    model.roi_heads.detections_per_class = int(config.get("detections_per_class") or 0)
    model.rpn.anchor_generator.__class__ = Fp32AnchorGenerator
    model.roi_heads.box_roi_pool.__class__ = model.roi_heads.mask_roi_pool.__class__ = LevelRoIAlign
    model.rpn.box_coder.__class__ = model.roi_heads.box_coder.__class__ = Fp32BoxCoder
    for part in (model.rpn, model.roi_heads):
        part.box_similarity = PairwiseIoU
        part.proposal_matcher = SlicedMatcher(part.proposal_matcher)
    return model


class CellMaskRCNN(MaskRCNN):
    """torchvision's Mask R-CNN; training skips its per-image degenerate-box check (a host sync
    each), made on the host instead (``check_boxes``, called by ``engine.to_device``)."""

    def forward(self, images: list[Tensor], targets: list[dict[str, Any]] | None = None) -> Any:
        if not self.training or targets is None:
            return super().forward(images, targets)
        images, targets = self.transform(images, targets)
        features = self.backbone(images.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        proposals, proposal_losses = self.rpn(images, features, targets)
        _, detector_losses = self.roi_heads(features, proposals, images.image_sizes, targets)
        return {**detector_losses, **proposal_losses}


class Fp32AnchorGenerator(AnchorGenerator):
    """torchvision's anchors, always in float32, and built once per input and feature size
    (training crops and tiles all share one): torchvision rebuilds them for every batch, with
    blocking copies of its Python sizes. It reads only the shape, dtype and device of the
    feature maps, so it is shown float32 stand-ins of their shape (no memory)."""

    CACHED = 4  # input shapes kept (a crop, a tile, ...); whole images of many sizes rebuild the oldest

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        device = feature_maps[0].device
        key = (tuple(image_list.tensors.shape[-2:]), tuple(tuple(f.shape[-2:]) for f in feature_maps), device)
        cache = self.__dict__.setdefault("_anchors", {})
        if key not in cache:
            stand_ins = [torch.empty((), dtype=torch.float32, device=device).expand(f.shape) for f in feature_maps]
            one = ImageList(image_list.tensors[:1], image_list.image_sizes[:1])
            if len(cache) >= self.CACHED:
                cache.pop(next(iter(cache)))
            cache[key] = super().forward(one, stand_ins)[0]
        return [cache[key]] * len(image_list.image_sizes)


class Fp32BoxCoder(BoxCoder):
    """torchvision's box coder (the same formulas) in float32 whatever the autocast dtype, its
    weights as Python numbers: torchvision casts the boxes to the deltas' dtype, fp16/bf16
    under autocast, and copies its weights and a 0.5 to the device at every call."""

    def decode(self, rel_codes: Tensor, boxes: list[Tensor]) -> Tensor:
        with torch.autocast(rel_codes.device.type, enabled=False):
            return super().decode(rel_codes.float(), [b.float() for b in boxes])

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        boxes = boxes.to(rel_codes.dtype)
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dw = torch.clamp(rel_codes[:, 2::4] / ww, max=self.bbox_xform_clip)
        dh = torch.clamp(rel_codes[:, 3::4] / wh, max=self.bbox_xform_clip)
        center_x = rel_codes[:, 0::4] / wx * widths[:, None] + ctr_x[:, None]
        center_y = rel_codes[:, 1::4] / wy * heights[:, None] + ctr_y[:, None]
        half_w = 0.5 * (torch.exp(dw) * widths[:, None])
        half_h = 0.5 * (torch.exp(dh) * heights[:, None])
        return torch.stack((center_x - half_w, center_y - half_h, center_x + half_w, center_y + half_h),
                           dim=2).flatten(1)

    def encode(self, reference_boxes: list[Tensor], proposals: list[Tensor]) -> tuple[Tensor, ...]:
        with torch.autocast(proposals[0].device.type, enabled=False):
            return super().encode([b.float() for b in reference_boxes], [p.float() for p in proposals])

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        wx, wy, ww, wh = self.weights
        ex_w, ex_h = proposals[:, 2] - proposals[:, 0], proposals[:, 3] - proposals[:, 1]
        gt_w, gt_h = reference_boxes[:, 2] - reference_boxes[:, 0], reference_boxes[:, 3] - reference_boxes[:, 1]
        dx = wx * ((reference_boxes[:, 0] + 0.5 * gt_w) - (proposals[:, 0] + 0.5 * ex_w)) / ex_w
        dy = wy * ((reference_boxes[:, 1] + 0.5 * gt_h) - (proposals[:, 1] + 0.5 * ex_h)) / ex_h
        return torch.stack((dx, dy, ww * torch.log(gt_w / ex_w), wh * torch.log(gt_h / ex_h)), dim=1)


class FrozenBatchNorm2d(TorchvisionFrozenBatchNorm2d):
    """torchvision's frozen BatchNorm (the same buffers and state-dict keys), its output in
    the input's dtype: the fp32 statistics are folded into a scale and shift first, cast
    once, so AMP activations stay fp16 through the backbone."""

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return torch.addcmul(shift.to(x.dtype)[None, :, None, None], x, scale.to(x.dtype)[None, :, None, None])


def check_boxes(targets: list[dict[str, Any]]) -> None:
    """torchvision's degenerate-box error, on host tensors before they go to the device."""
    for target in targets:
        boxes = target.get("boxes")
        if boxes is None:
            continue
        bad = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if bad.any():
            raise ValueError(f"image {target.get('image_id')}: box {boxes[bad][0].tolist()} has no width or height; "
                             "every training box must have positive width and height")


class CellTransform(GeneralizedRCNNTransform):
    """torchvision's transform, but small images are not blown up (cells keep their size,
    so the anchors fit), or every image is scaled by one fixed factor (``input_scale``), and
    images at native scale skip the mask resize (no float copies of every ground-truth mask)."""

    def __init__(self, min_size: int, max_size: int, max_upscale: float = 1.0,
                 input_scale: float | None = None) -> None:
        super().__init__(min_size, max_size, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
        self.max_upscale = max_upscale
        self.input_scale = input_scale
        self.warned_cap = False
        self._stats: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """torchvision's normalisation with the mean and std kept on the image's device, copied
        there once (torchvision copies them from Python lists for every image)."""
        if not image.is_floating_point():
            raise TypeError(f"input images must be floating point in [0, 1], got {image.dtype}")
        key = (image.device, image.dtype)
        if key not in self._stats:
            self._stats[key] = tuple(torch.tensor(v, dtype=image.dtype, device=image.device)[:, None, None]
                                     for v in (self.image_mean, self.image_std))
        mean, std = self._stats[key]
        return (image - mean) / std

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "CellTransform":
        return cls(config["min_size"], config["max_size"], config["max_upscale"], config.get("input_scale"))

    def scale_for(self, height: int, width: int) -> float:
        """The resize factor of one image. A fixed ``input_scale`` keeps a cell the same size
        in a 256 px crop, a tile and a whole image; only --max_size (memory) can lower it."""
        cap = self.max_size / max(height, width)
        if self.input_scale:
            return min(self.input_scale, cap)
        return min(self.min_size[-1] / min(height, width), cap, self.max_upscale)

    def resize(self, image: torch.Tensor, target: dict | None = None) -> tuple[torch.Tensor, dict | None]:
        height, width = image.shape[-2:]
        scale = self.scale_for(height, width)
        if self.input_scale and scale < self.input_scale and not self.warned_cap:
            self.warned_cap = True  # once per model: every large image would repeat it
            warnings.warn(f"a {height}x{width} image is scaled by {scale:.2f}, not --input_scale {self.input_scale}, "
                          f"to stay within --max_size {self.max_size}, so its cells look smaller than in training "
                          f"(whole images: the validation loss, or prediction with --tile 0; raise --max_size "
                          f"where memory allows)", stacklevel=2)
        if abs(scale - 1.0) < 1e-6:
            return image, target
        image = F.interpolate(image[None], scale_factor=scale, mode="bilinear",
                              recompute_scale_factor=True, align_corners=False)[0]
        if target is None:
            return image, target
        target = dict(target)
        target["resize"] = (image.shape[-1] / width, image.shape[-2] / height)  # --mask_iou's paste frames
        target["boxes"] = scale_boxes(target["boxes"], *target["resize"])
        if isinstance(target.get("masks"), PackedMasks):
            target["masks"] = target["masks"].resized(tuple(image.shape[-2:]))
        elif "masks" in target:
            target["masks"] = resize_masks(target["masks"], image.shape[-2:])
        return image, target


def resize_masks(masks: torch.Tensor, size: tuple[int, int], chunk: int = 64) -> torch.Tensor:
    """Nearest resize of uint8 masks in chunks, so no float copy of all masks exists at once."""
    out = torch.empty((masks.shape[0], *size), dtype=masks.dtype, device=masks.device)
    for start in range(0, masks.shape[0], chunk):
        part = masks[start:start + chunk, None].float()
        out[start:start + chunk] = F.interpolate(part, size=tuple(size))[:, 0].to(masks.dtype)
    return out


def project_masks_on_boxes(gt_masks: torch.Tensor | PackedMasks, boxes: torch.Tensor, matched_idxs: torch.Tensor,
                           size: int, aligned: bool = False) -> torch.Tensor:
    """Mask targets of the positive RoIs, equal to torchvision's, without its float copy of
    every ground-truth mask at full image size (gigabytes with 800 cells per image).

    One roi_align for all positive RoIs (at most ``box_batch_size_per_image`` x the positive
    fraction per image, whatever the instance count), each RoI sampling its instance's mask on
    a canvas the size of the largest box (``PackedMasks.canvases``): no loop over instances and
    no host sync. ``gt_masks`` is the packed crops the dataset produces or torchvision's
    [N, H, W] tensor (then each RoI's canvas is its whole mask, as in torchvision).
    ``aligned``: pixel k spans [k, k + 1), as a pasted mask covers it (``masks.paste_frames``);
    the mask head's targets keep torchvision's convention (pixel k centred on k).
    """
    if isinstance(gt_masks, PackedMasks):
        canvas, origin = gt_masks.canvases(matched_idxs)
        boxes = boxes - origin.to(boxes.dtype).repeat(1, 2)
    else:
        canvas = gt_masks[matched_idxs]
    rois = torch.cat([torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)[:, None], boxes], dim=1)
    return roi_align(canvas[:, None].to(boxes.dtype), rois, (size, size), 1.0, aligned=aligned)[:, 0]


class PairwiseIoU(NamedTuple):
    """``box_iou(gt, anchors)``, not yet computed: ``SlicedMatcher`` evaluates it slice by slice."""

    gt: torch.Tensor
    anchors: torch.Tensor


class SlicedMatcher(Matcher):
    """torchvision's ``Matcher``, same matches, without the [cells, anchors] IoU matrix.

    The RPN matches every ground-truth box against ~260k anchors of a 1000x1000 image:
    ``box_iou`` holds [N, M] and [N, M, 2] float temporaries (about 9 MB per cell, 7 GB at 800
    cells) and the matcher a [N, M] result and mask. Given a ``PairwiseIoU`` (the RPN's
    ``box_similarity`` is ``PairwiseIoU`` here), this computes slices of ``pairs`` IoUs twice:
    once for each anchor's best box and each box's best IoU, once to find the anchors that
    reach a box's best (torchvision's low-quality matches). A plain matrix is matched as before.
    """

    def __init__(self, matcher: Matcher, pairs: int = 1 << 22) -> None:
        super().__init__(matcher.high_threshold, matcher.low_threshold, matcher.allow_low_quality_matches)
        self.pairs = pairs

    def __call__(self, match_quality_matrix: torch.Tensor | PairwiseIoU) -> torch.Tensor:
        if not isinstance(match_quality_matrix, PairwiseIoU):
            return super().__call__(match_quality_matrix)
        gt, anchors = match_quality_matrix
        if len(gt) == 0:  # torchvision's error for an image without boxes
            return super().__call__(gt.new_zeros((0, len(anchors))))
        step = max(1, self.pairs // len(gt))
        starts = range(0, len(anchors), step)
        best_per_gt = gt.new_full((len(gt),), -math.inf)
        values, matches = [], []
        for start in starts:
            iou = box_iou(gt, anchors[start:start + step])
            best = iou.max(dim=0)
            values.append(best.values)
            matches.append(best.indices)
            best_per_gt = torch.maximum(best_per_gt, iou.max(dim=1).values)
        matched_vals, all_matches = torch.cat(values), torch.cat(matches)
        # torch.where, not boolean-mask assignment: the same matches without a host sync each.
        below = torch.full_like(all_matches, self.BELOW_LOW_THRESHOLD)
        between = torch.full_like(all_matches, self.BETWEEN_THRESHOLDS)
        matches = torch.where(matched_vals < self.low_threshold, below,
                              torch.where(matched_vals < self.high_threshold, between, all_matches))
        if self.allow_low_quality_matches:
            for start in starts:
                reach = (box_iou(gt, anchors[start:start + step]) == best_per_gt[:, None]).any(dim=0)
                part = slice(start, start + step)
                matches[part] = torch.where(reach, all_matches[part], matches[part])
        return matches


class LeanRPN(RegionProposalNetwork):
    """torchvision's RPN: the same proposals and losses, with host syncs per NMS chunk and one
    for the kept counts, not per image and level."""

    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_shapes: list[tuple[int, int]],
                         num_anchors_per_level: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        num_images = proposals.shape[0]
        objectness = objectness.detach().reshape(num_images, -1)
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)
        batch_idx = torch.arange(num_images, device=proposals.device)[:, None]
        scores = objectness[batch_idx, top_n_idx].sigmoid()
        boxes = torch.stack([box_ops.clip_boxes_to_image(b, s)
                             for b, s in zip(proposals[batch_idx, top_n_idx], image_shapes)])
        sides = boxes[..., 2:] - boxes[..., :2]
        valid = (sides >= self.min_size).all(dim=-1) & (scores >= self.score_thresh)
        # Dropped boxes are not removed (a sync each) but scored -inf: they sort last and never
        # suppress a kept box, so NMS keeps exactly what it keeps without them.
        scores = torch.where(valid, scores, -math.inf)
        per_level = [min(self.pre_nms_top_n(), n) for n in num_anchors_per_level]
        boxes, scores = boxes.reshape(-1, 4), scores.reshape(-1)
        keep = nms_segments(boxes, scores, per_level * num_images, self.nms_thresh,
                            max(max(shape) for shape in image_shapes))
        image_of = batch_idx.expand(num_images, top_n_idx.shape[1]).reshape(-1)
        picked = top_per_image(scores, keep, image_of, num_images, self.post_nms_top_n())
        return [boxes[p] for p in picked], [scores[p] for p in picked]

    def assign_targets_to_anchors(self, anchors: list[Tensor],
                                  targets: list[dict[str, Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
        labels, matched_gt_boxes = [], []
        for anchors_per_image, target in zip(anchors, targets):
            gt_boxes = target["boxes"]
            if gt_boxes.numel() == 0:
                matched_gt_boxes.append(torch.zeros_like(anchors_per_image, dtype=torch.float32))
                labels.append(anchors_per_image.new_zeros(len(anchors_per_image), dtype=torch.float32))
                continue
            matched = self.proposal_matcher(self.box_similarity(gt_boxes, anchors_per_image))
            matched_gt_boxes.append(gt_boxes[matched.clamp(min=0)])
            ignored = torch.full_like(matched, -1, dtype=torch.float32)
            labels.append(torch.where(matched == self.proposal_matcher.BETWEEN_THRESHOLDS, ignored,
                                      (matched >= 0).to(torch.float32)))
        return labels, matched_gt_boxes

    def compute_loss(self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor],
                     regression_targets: list[Tensor]) -> tuple[Tensor, Tensor]:
        sampler = self.fg_bg_sampler
        picked = [sample(lab, sampler.batch_size_per_image, sampler.positive_fraction) for lab in labels]
        positive = torch.cat([p for p, _ in picked])
        weight = (positive | torch.cat([n for _, n in picked])).float()
        count = weight.sum().clamp(min=1)
        labels_all = torch.cat(labels, dim=0)
        objectness_loss = (F.binary_cross_entropy_with_logits(objectness.flatten(), labels_all, reduction="none")
                           * weight).sum() / count
        box_loss = F.smooth_l1_loss(pred_bbox_deltas, torch.cat(regression_targets, dim=0), beta=1 / 9,
                                    reduction="none").sum(dim=1)
        # torch.where, not a product: the targets of an image without boxes hold -inf.
        return objectness_loss, torch.where(positive, box_loss, 0.0).sum() / count


class LeanRoIHeads(RoIHeads):
    """torchvision's RoI heads, the same training losses: a fixed number of RoIs per image
    (positives first, each with a loss weight) instead of a variable one found by nonzero.
    ``mask_targets`` computes the mask head's targets (a benchmark sets torchvision's on one
    model to measure it, without touching torchvision's module)."""

    mask_targets: Callable[[Any, Tensor, Tensor, int], Tensor] = staticmethod(project_masks_on_boxes)
    detections_per_class: int = 0  # > 0: at most this many detections per image and class
    class_weights: Tensor | None = None  # classification-loss weight per class (--class_balance), on the device

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None) -> tuple[list, dict[str, Tensor]]:
        cascade = getattr(self, "cascade", None)
        if not self.training:
            if cascade is None and getattr(self, "type_head", None) is None:
                return super().forward(features, proposals, image_shapes, targets)
            return self.predict(features, proposals, image_shapes), {}
        proposals, matched_idxs, labels, regression_targets, weights, num_pos = \
            self.select_training_samples(proposals, targets)
        pooled = self.box_roi_pool(features, proposals, image_shapes)
        if cascade is not None:  # each stage passes back its share of the gradient into the features
            pooled = scale_gradient(pooled, cascade.gradient_share)
        class_logits, box_regression = self.box_predictor(self.box_head(pooled))
        loss_classifier, loss_box_reg = weighted_fastrcnn_loss(class_logits, box_regression, labels,
                                                               regression_targets, weights, self.class_weights)
        positives = num_pos.tolist()  # host sync: how many RoIs per image the mask head takes
        mask_proposals = [p[:n] for p, n in zip(proposals, positives)]
        mask_matched = [m[:n] for m, n in zip(matched_idxs, positives)]
        mask_pooled = self.mask_roi_pool(features, mask_proposals, image_shapes)
        mask_logits = self.mask_predictor(self.mask_head(mask_pooled))
        size = mask_logits.shape[-1]
        mask_labels = torch.cat([t["labels"][m] for t, m in zip(targets, mask_matched)])
        mask_targets = torch.cat([self.mask_targets(t["masks"], p, m, size)
                                  for t, p, m in zip(targets, mask_proposals, mask_matched)])
        chosen = mask_logits[torch.arange(len(mask_labels), device=mask_logits.device), mask_labels]
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg,
                  "loss_mask": mask_loss(mask_logits, chosen, mask_targets)}
        scorer = getattr(self, "mask_iou_head", None)
        if scorer is not None:  # Mask Scoring (--mask_iou): the IoU each mask reaches, learnt on the same RoIs
            # each cell read where the predicted mask's bins will land once pasted (``paste_frames``),
            # and its whole area: the IoU the mask will score on the image
            frames = [paste_frames(p, size, t.get("resize", (1.0, 1.0))) for t, p in zip(targets, mask_proposals)]
            cells = torch.cat([project_masks_on_boxes(t["masks"], f, m, size, aligned=True)
                               for t, f, m in zip(targets, frames, mask_matched)])
            cell_areas = torch.cat([mask_areas(t["masks"])[m] for t, m in zip(targets, mask_matched)])
            targets_iou = mask_iou_targets(chosen, cells, torch.cat(frames), cell_areas)
            losses["loss_mask_iou"] = mask_iou_loss(scorer(mask_pooled, chosen, mask_labels), targets_iou)
        types = getattr(self, "type_head", None)
        if types is not None:  # the cell-type map (--type_map): every pixel of every cell, on the finest level
            losses["loss_types"] = type_loss(types(features), targets, image_shapes)
        if cascade is not None:  # Cascade (--cascade): the later box stages, on the refined boxes of these RoIs
            losses["loss_cascade"] = cascade.losses(self, features, proposals, image_shapes, targets, class_logits,
                                                    box_regression, labels, weights)
        return [], losses

    def predict(self, features: dict[str, Tensor], proposals: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """torchvision's prediction output (boxes, scores, labels, masks of each image) through
        ``detect_boxes``; ``predictor.py`` is the batched path, this is ``model(images)``'s."""
        boxes, scores, labels = detect_boxes(self, features, proposals, image_shapes)
        results = [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(boxes, scores, labels)]
        if sum(len(b) for b in boxes) == 0:  # shapes: no detection in any image, nothing to pool
            side = 2 * self.mask_roi_pool.output_size[0]  # the mask predictor's upsampled side
            for r in results:
                r["masks"] = r["boxes"].new_zeros((0, 1, side, side))
            return results
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))
        for r, probs in zip(results, maskrcnn_inference(mask_logits, labels)):
            r["masks"] = probs
        return results

    def postprocess_detections(self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor],
                               image_shapes: list[tuple[int, int]]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """torchvision's detections (score threshold, per-class NMS, the best ``detections_per_img``,
        of them at most ``detections_per_class`` of a class) for the whole batch at once: the NMS
        calls of ``nms_segments`` and one count read, not about ten syncs per image (each tile
        and view when predicting)."""
        return self.select_detections(F.softmax(class_logits, -1), self.box_coder.decode(box_regression, proposals),
                                      [len(p) for p in proposals], image_shapes)

    def select_detections(self, probs: Tensor, decoded: Tensor, counts: list[int],
                          image_shapes: list[tuple[int, int]]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """``postprocess_detections`` from class probabilities [R, classes] and each class's box
        [R, classes, 4] of the images' RoIs (``counts`` each)."""
        classes = probs.shape[-1]
        boxes, scores = [], []
        for b, s, shape in zip(decoded.split(counts), probs.split(counts), image_shapes):
            # class-major, without the background: one NMS segment per image and class
            boxes.append(box_ops.clip_boxes_to_image(b, shape)[:, 1:].transpose(0, 1).reshape(-1, 4))
            scores.append(s[:, 1:].transpose(0, 1).reshape(-1))
        boxes, scores = torch.cat(boxes), torch.cat(scores)
        sides = boxes[:, 2:] - boxes[:, :2]
        scores = torch.where((scores > self.score_thresh) & (sides >= 1e-2).all(dim=1), scores, -math.inf)
        keep = nms_segments(boxes, scores, [n for n in counts for _ in range(classes - 1)], self.nms_thresh,
                            max(max(shape) for shape in image_shapes))
        device = probs.device
        image_of = torch.cat([torch.full((n * (classes - 1),), i, device=device) for i, n in enumerate(counts)])
        labels = torch.cat([torch.arange(1, classes, device=device).repeat_interleave(n) for n in counts])
        picked = top_per_image(scores, keep, image_of, len(counts), self.detections_per_img,
                               image_of * classes + labels, self.detections_per_class)
        return [boxes[p] for p in picked], [scores[p] for p in picked], [labels[p] for p in picked]

    def assign_targets_to_proposals(self, proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor],
                                    matcher: Matcher | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Each proposal's matched box and label (0 background, -1 ignored), by ``matcher``
        (a cascade stage's) or the heads' own."""
        matcher = matcher or self.proposal_matcher
        matched_idxs, labels = [], []
        for proposals_in_image, boxes, classes in zip(proposals, gt_boxes, gt_labels):
            if boxes.numel() == 0:
                zeros = proposals_in_image.new_zeros(len(proposals_in_image), dtype=torch.int64)
                matched_idxs.append(zeros)
                labels.append(zeros)
                continue
            matched = matcher(self.box_similarity(boxes, proposals_in_image))
            clamped = matched.clamp(min=0)
            image_labels = torch.where(matched == matcher.BELOW_LOW_THRESHOLD, 0, classes[clamped].to(torch.int64))
            matched_idxs.append(clamped)
            labels.append(torch.where(matched == matcher.BETWEEN_THRESHOLDS, -1, image_labels))
        return matched_idxs, labels

    def select_training_samples(self, proposals: list[Tensor], targets: list[dict[str, Tensor]] | None) -> tuple:
        """Each image's ``min(box_batch_size_per_image, proposals)`` RoIs: the sampled positives
        first, then the sampled negatives, then (weight 0) whatever fills the fixed count."""
        self.check_targets(targets)
        dtype = proposals[0].dtype
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        proposals = self.add_gt_proposals(proposals, gt_boxes)
        matched_idxs, labels = self.assign_targets_to_proposals(proposals, gt_boxes, [t["labels"] for t in targets])
        sampler = self.fg_bg_sampler
        picked_boxes, weights, num_pos = [], [], []
        for i, image_labels in enumerate(labels):
            positive, negative = sample(image_labels, sampler.batch_size_per_image, sampler.positive_fraction)
            priority = positive.to(torch.int8) * 2 + negative.to(torch.int8)
            order = torch.argsort(priority, descending=True, stable=True)[:sampler.batch_size_per_image]
            proposals[i], labels[i], matched_idxs[i] = proposals[i][order], image_labels[order], matched_idxs[i][order]
            weights.append(priority[order] > 0)
            num_pos.append(positive.sum())
            boxes = gt_boxes[i] if gt_boxes[i].numel() else gt_boxes[i].new_zeros((1, 4))
            picked_boxes.append(boxes[matched_idxs[i]])
        regression_targets = self.box_coder.encode(picked_boxes, proposals)
        return proposals, matched_idxs, labels, regression_targets, weights, torch.stack(num_pos)


def detect_boxes(heads: RoIHeads, features: dict[str, Tensor], proposals: list[Tensor],
                 image_shapes: list[tuple[int, int]]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Each image's detections (boxes, scores, labels) from the box head, or with a cascade
    (``--cascade``) from its stages: their mean class probabilities, the last stage's boxes;
    with a cell-type map (``--type_map``) the probabilities re-weighed by it first.
    ``heads`` may be torchvision's own (a benchmark's baseline), which has neither."""
    class_logits, box_regression = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, proposals,
                                                                                          image_shapes)))
    cascade, types = getattr(heads, "cascade", None), getattr(heads, "type_head", None)
    if cascade is None and (types is None or types.weight <= 0):
        return heads.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
    if cascade is None:
        probs = F.softmax(class_logits, -1)
        boxes = heads.box_coder.decode(box_regression, proposals)
    else:
        probs, boxes = cascade.refine(heads, features, proposals, image_shapes, class_logits, box_regression)
        boxes = boxes[:, None].expand(-1, probs.shape[-1], -1)
    if types is not None and types.weight > 0:  # W = 0: the box classifier alone, the map not even computed
        probs = rescore(probs, types(features), proposals, image_shapes, types.weight)
    return heads.select_detections(probs, boxes, [len(p) for p in proposals], image_shapes)


class ContextRoIAlign(nn.Module):
    """``--context_roi``: a box pooler whose RoI features are the RoI's own (``pool``) and those
    of its box enlarged ``factor`` times about its centre, clipped to the image, concatenated
    on the channels ([R, 2C, S, S]). Every caller of ``box_roi_pool`` (training, prediction,
    cascade stages) gets the surroundings without a change; the box head takes 2C channels."""

    def __init__(self, pool: MultiScaleRoIAlign, factor: float) -> None:
        super().__init__()
        self.pool, self.factor = pool, float(factor)

    @property
    def output_size(self) -> tuple[int, ...]:
        return self.pool.output_size

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        # One pooling of each image's boxes followed by its enlarged ones: one RoI-count read, not two.
        both = [torch.cat([b, box_ops.clip_boxes_to_image(enlarge_boxes(b, self.factor), shape)])
                for b, shape in zip(boxes, image_shapes)]  # per image, not per RoI
        parts = self.pool(x, both, image_shapes).split([len(b) for b in both])  # counts from shapes: no sync
        own = torch.cat([part[:len(b)] for part, b in zip(parts, boxes)])
        around = torch.cat([part[len(b):] for part, b in zip(parts, boxes)])
        return torch.cat([own, around], dim=1)


def enlarge_boxes(boxes: Tensor, factor: float) -> Tensor:
    """Boxes (x1, y1, x2, y2) scaled ``factor`` times about their centres."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * (factor / 2)
    return torch.cat([centre - half, centre + half], dim=1)


class LevelRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign, the same output, with one host sync (the RoI count of
    each level) instead of a nonzero per level."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        if len(features) == 1:
            return roi_align(features[0], rois, self.output_size, self.scales[0], self.sampling_ratio)
        levels = self.map_levels(boxes)
        order = torch.argsort(levels, stable=True)
        counts = level_counts(levels, len(features))  # host sync: RoIs per level
        pooled = [roi_align(feature, part, self.output_size, scale, self.sampling_ratio).to(features[0].dtype)
                  for feature, part, scale in zip(features, rois[order].split(counts), self.scales)]
        return torch.cat(pooled).index_select(0, torch.argsort(order))


def sample(labels: Tensor, batch_size: int, positive_fraction: float) -> tuple[Tensor, Tensor]:
    """Boolean masks of one image's sampled positives (label >= 1) and negatives (label 0), as
    torchvision's BalancedPositiveNegativeSampler draws them: up to ``batch_size *
    positive_fraction`` positives and negatives up to ``batch_size`` in all, uniformly at random,
    by random keys and topk, so no count leaves the device."""
    keys = torch.rand(labels.shape, device=labels.device)
    quota = int(batch_size * positive_fraction)
    positive = _random_subset(labels >= 1, keys, quota, quota)
    negative = _random_subset(labels == 0, keys, batch_size, batch_size - positive.sum())
    return positive, negative


def _random_subset(candidates: Tensor, keys: Tensor, most: int, limit: Tensor | int) -> Tensor:
    """A mask of up to ``limit`` (at most ``most``) random candidates."""
    values, index = torch.where(candidates, keys, -1.0).topk(min(most, candidates.numel()))
    take = (values >= 0) & (torch.arange(len(index), device=keys.device) < limit)
    return torch.zeros_like(candidates).scatter(0, index, take)


def nms_segments(boxes: Tensor, scores: Tensor, lengths: list[int], threshold: float, bound: float) -> Tensor:
    """Indices kept by NMS within each consecutive segment of ``lengths`` boxes (one image's
    pyramid level), segments packed into calls of up to NMS_CHUNK boxes and kept apart by
    coordinate offsets; each call's kept indices by score.

    ``bound`` (a host number) is at least every coordinate: the boxes are clipped to images of
    at most that side, so the offsets need no read of the boxes. They are added in float32
    while they stay below ``FLOAT32_OFFSETS`` (1/256 px resolution, far below any IoU that
    matters), in float64 beyond: float64 is 32-64x slower on consumer GPUs."""
    keep, start = [boxes.new_zeros(0, dtype=torch.int64)], 0
    span = float(bound) + 1.0
    for chunk in _chunks(lengths, NMS_CHUNK):
        end = start + sum(chunk)
        if end == start:
            continue
        dtype = torch.float32 if len(chunk) * span < FLOAT32_OFFSETS else torch.float64
        group = torch.cat([torch.full((n,), i * span, dtype=dtype, device=boxes.device) for i, n in enumerate(chunk)])
        part = boxes[start:end].to(dtype) + group[:, None]
        keep.append(nms(part, scores[start:end].to(dtype), threshold) + start)  # host sync: the kept count
        start = end
    return torch.cat(keep)


def _chunks(lengths: list[int], cap: int) -> list[list[int]]:
    """Consecutive segment lengths grouped so that each group holds at most ``cap`` boxes (a
    longer segment alone)."""
    groups: list[list[int]] = [[]]
    for n in lengths:
        if groups[-1] and sum(groups[-1]) + n > cap:
            groups.append([])
        groups[-1].append(n)
    return [g for g in groups if g]


def top_per_image(scores: Tensor, keep: Tensor, image_of: Tensor, num_images: int, top_n: int,
                  class_of: Tensor | None = None, per_class: int = 0) -> list[Tensor]:
    """Each image's ``top_n`` best indices among ``keep`` (flat indices of boxes of image
    ``image_of``), best first, without -inf scores: torchvision's per-image order and cut.
    ``per_class`` > 0 first drops all but the best ``per_class`` of each image and class
    (``class_of``, numbering image-class pairs), so that a frequent class cannot crowd a rare
    one out of the image's ``top_n``: the scorer counts per image and class."""
    kept_scores = scores[keep]
    if per_class > 0 and class_of is not None:
        beyond = group_ranks(kept_scores, class_of[keep]) >= per_class
        kept_scores = torch.where(beyond, -math.inf, kept_scores)
    order = torch.argsort(kept_scores, descending=True, stable=True)
    image = image_of[keep[order]]
    by_image = torch.argsort(image, stable=True)
    order, image = order[by_image], image[by_image]
    rank = torch.arange(len(order), device=scores.device) - torch.searchsorted(image, image)
    taken = (rank < top_n) & (kept_scores[order] > -math.inf)
    starts = torch.searchsorted(image, torch.arange(num_images, device=scores.device))
    counts = torch.zeros(num_images, dtype=torch.int64, device=scores.device).index_add_(0, image, taken.long())
    bounds = torch.stack([starts, counts], dim=1).tolist()  # host sync: each image's count
    return [keep[order[start:start + n]] for start, n in bounds]


def group_ranks(scores: Tensor, groups: Tensor) -> Tensor:
    """Each element's rank within its group (0: the group's highest score), on the device."""
    order = torch.argsort(scores, descending=True, stable=True)
    by_group = torch.argsort(groups[order], stable=True)
    ranked = order[by_group]
    sorted_groups = groups[ranked]
    ranks = torch.empty_like(ranked)
    ranks[ranked] = torch.arange(len(ranked), device=scores.device) - torch.searchsorted(sorted_groups, sorted_groups)
    return ranks


def weighted_fastrcnn_loss(class_logits: Tensor, box_regression: Tensor, labels: list[Tensor],
                           regression_targets: list[Tensor], weights: list[Tensor],
                           class_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """torchvision's fastrcnn_loss over the RoIs of weight 1 (mean classification loss, box loss
    summed over positives per sampled RoI), computed on all RoIs without indexing them.
    ``class_weights`` (``--class_balance``) weighs each RoI's classification by its class, the
    mean taken over those weights (as ``cross_entropy(weight=...)`` does)."""
    labels_all, weight = torch.cat(labels), torch.cat(weights)
    count = weight.sum().clamp(min=1)
    classes = labels_all.clamp(min=0)
    ce = F.cross_entropy(class_logits, classes, reduction="none")
    if class_weights is None:
        classification = torch.where(weight, ce, 0.0).sum() / count
    else:
        per_roi = torch.where(weight, class_weights[classes], 0.0)
        classification = (per_roi * ce).sum() / per_roi.sum().clamp(min=1e-6)
    rows = torch.arange(len(classes), device=classes.device)
    # one box per RoI (a cascade stage's), or one per class (torchvision's), of which the RoI's class
    per_class = box_regression.shape[-1] != 4
    predicted = box_regression.reshape(len(classes), -1, 4)[rows, classes] if per_class else box_regression
    box = F.smooth_l1_loss(predicted, torch.cat(regression_targets), beta=1 / 9, reduction="none").sum(dim=1)
    return classification, torch.where(weight & (labels_all > 0), box, 0.0).sum() / count


def scale_gradient(x: Tensor, share: float) -> Tensor:
    """``x`` unchanged forward; backward, only ``share`` of the gradient reaches what made it."""
    return x.detach() + (x - x.detach()) * share


def mask_loss(mask_logits: Tensor, chosen: Tensor, mask_targets: Tensor) -> Tensor:
    """torchvision's ``maskrcnn_loss``: the mean binary cross-entropy of each positive RoI's
    mask of its class (``chosen``, from ``mask_logits``) against its target, whose targets
    here come from ``LeanRoIHeads.mask_targets`` (packed masks, which torchvision's cannot take)."""
    if mask_targets.numel() == 0:  # a shape, not a read: no positive RoI in the batch
        return mask_logits.sum() * 0
    return F.binary_cross_entropy_with_logits(chosen, mask_targets)


def use_torchvision_detector(model: MaskRCNN) -> None:
    """Back to torchvision's own classes and matchers on a built model: the baseline of side-by-
    side benchmarks and equality tests (same weights, same results, its host syncs). The
    transform stays ``CellTransform``, which resizes as torchvision's does at the same factor."""
    model.__class__ = MaskRCNN
    model.rpn.__class__, model.roi_heads.__class__ = RegionProposalNetwork, RoIHeads
    model.rpn.anchor_generator.__class__ = AnchorGenerator
    model.rpn.box_coder.__class__ = model.roi_heads.box_coder.__class__ = BoxCoder
    box_pool = getattr(model.roi_heads.box_roi_pool, "pool", model.roi_heads.box_roi_pool)  # inside --context_roi's
    box_pool.__class__ = model.roi_heads.mask_roi_pool.__class__ = MultiScaleRoIAlign
    for part in (model.rpn, model.roi_heads):
        matcher = part.proposal_matcher
        part.proposal_matcher = Matcher(matcher.high_threshold, matcher.low_threshold, matcher.allow_low_quality_matches)
        part.box_similarity = box_ops.box_iou
