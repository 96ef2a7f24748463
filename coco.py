"""The single source of truth for COCO conversion and scoring.

Ground truth comes from the decoded instances, predictions from model outputs; both become
run-length encoded masks, and ``evaluate`` names every metric exactly (AP is AP@[.5:.95]).
Scoring uses faster-coco-eval, a C++ drop-in for pycocotools' COCOeval: all 12 stats agree to
1e-6 and it is 15x faster on 101 images x 500 detections (benchmarks/evaluation.py).
"""
from __future__ import annotations

import contextlib
import io
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from faster_coco_eval import COCO, COCOeval_faster
from pycocotools import mask as mask_util
from torchvision.models.detection import roi_heads

from dataloader import NUM_CLASSES, Instances

IOU_TYPES = ("segm", "bbox")
METRICS = ("AP", "AP50", "AP75")
CATEGORIES = [{"id": c, "name": f"class{c}"} for c in range(1, NUM_CLASSES + 1)]


def build_coco_gt(instances: Sequence[Instances], image_ids: Sequence[int]) -> COCO:
    """COCO ground truth from cached instances; built once per run, not per epoch."""
    images, annotations = [], []
    for inst, image_id in zip(instances, image_ids):
        images.append({"id": int(image_id), "height": inst.height, "width": inst.width})
        canvas = np.zeros((inst.height, inst.width), dtype=np.uint8, order="F")
        for label, box, crop in zip(inst.labels, inst.boxes, inst.crops):
            x1, y1, x2, y2 = (int(v) for v in box)
            canvas[y1:y2, x1:x2] = crop
            rle = mask_util.encode(canvas)
            canvas[y1:y2, x1:x2] = 0
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": int(image_id),
                "category_id": int(label),
                "segmentation": rle,
                "area": float(crop.sum()),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "iscrowd": 0,
            })
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def outputs_to_coco(output: dict, image_id: int, mask_thresh: float = 0.5) -> list[dict]:
    """One image's model output as COCO results with RLE masks.

    Outputs of a model whose transform has ``paste_masks = False`` (28x28 probabilities and
    ``image_size``) are pasted per box and encoded from the crop; tiled predictions bring
    their ``crops`` already pasted; fully pasted masks [K, 1, H, W] are encoded as they are.
    All give the same RLE.
    """
    boxes = output["boxes"].detach().float().cpu()
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    if "image_size" in output:
        height, width = output["image_size"]
        crops = output["crops"] if "crops" in output else mask_crops(output["masks"], boxes, (height, width),
                                                                       mask_thresh)
        rles = [rle_from_crop(crop, x0, y0, height, width) for x0, y0, crop in crops]
    else:
        rles = encode_full_masks(output["masks"][:, 0], mask_thresh)
    results = []
    for (x1, y1, x2, y2), score, label, rle in zip(boxes.tolist(), scores, labels, rles):
        results.append({
            "image_id": int(image_id),
            "category_id": int(label),
            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
            "score": round(score, 5),
            "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
        })
    return results


def mask_crops(masks: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int],
               mask_thresh: float = 0.5) -> list[tuple[int, int, np.ndarray]]:
    """Binary masks (x0, y0, crop) exactly as torchvision's paste_masks_in_image would place
    them, but each only inside its (clipped) box."""
    height, width = image_size
    if len(masks) == 0:
        return []
    padded, scale = roi_heads.expand_masks(masks.detach().float().cpu(), padding=1)
    expanded = roi_heads.expand_boxes(boxes.float().cpu(), scale).to(torch.int64).tolist()
    crops = []
    for mask, (bx0, by0, bx1, by1) in zip(padded, expanded):
        w, h = max(bx1 - bx0 + 1, 1), max(by1 - by0 + 1, 1)
        resized = F.interpolate(mask[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        x0, x1 = max(bx0, 0), min(bx1 + 1, width)
        y0, y1 = max(by0, 0), min(by1 + 1, height)
        crop = resized[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0] > mask_thresh
        crops.append((x0, y0, crop.numpy()))
    return crops


def rle_from_crop(crop: np.ndarray, x0: int, y0: int, height: int, width: int) -> dict:
    """Compressed COCO RLE of a full-image mask that is zero outside ``crop`` at (x0, y0):
    runs are computed on the crop only, so the cost does not grow with the image."""
    h, w = crop.shape
    columns = np.zeros((w, h + 2), dtype=np.int8)  # column-major, as COCO RLE counts
    columns[:, 1:-1] = crop.T
    edges = np.diff(columns, axis=1)
    start_col, start_row = np.nonzero(edges == 1)
    end_col, end_row = np.nonzero(edges == -1)
    starts = (x0 + start_col) * height + y0 + start_row
    ends = (x0 + end_col) * height + y0 + end_row
    if len(starts) > 1:  # a run that ends at the bottom row continues at the top of the next column
        joined = starts[1:] == ends[:-1]
        starts = starts[np.concatenate([[True], ~joined])]
        ends = ends[np.concatenate([~joined, [True]])]
    bounds = np.concatenate([[0], np.stack([starts, ends], axis=1).ravel(), [height * width]])
    counts = np.diff(bounds)
    if len(counts) > 1 and counts[-1] == 0:
        counts = counts[:-1]
    return mask_util.frPyObjects({"size": [height, width], "counts": counts.tolist()}, height, width)


def encode_full_masks(masks: torch.Tensor, mask_thresh: float = 0.5, chunk: int = 64) -> list[dict]:
    """RLE of full-image mask probabilities [K, H, W], in chunks to bound memory."""
    rles: list[dict] = []
    for start in range(0, len(masks), chunk):
        binary = (masks[start:start + chunk] > mask_thresh).to(torch.uint8).cpu().numpy()
        rles.extend(mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0))))
    return rles


def evaluate(coco_gt: COCO, results: list[dict], max_dets: int = 100,
             iou_types: Iterable[str] = IOU_TYPES) -> dict[str, float]:
    """``{iou_type}_{AP|AP50|AP75}`` and per-class ``{iou_type}_AP50_class{c}``; zeros, not a
    crash, when there are no predictions."""
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        if not results:
            metrics.update(_zero_metrics(iou_type))
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes([dict(r) for r in results])
            evaluator = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=lambda *a, **k: None)
            evaluator.params.maxDets = [1, 10, max_dets]
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        metrics.update(_named_metrics(evaluator, iou_type))
    return metrics


def _named_metrics(evaluator: COCOeval_faster, iou_type: str) -> dict[str, float]:
    stats = evaluator.stats
    out = {f"{iou_type}_AP": float(stats[0]), f"{iou_type}_AP50": float(stats[1]),
           f"{iou_type}_AP75": float(stats[2])}
    # precision: [iou thresholds, recall, class, area range, max dets]; -1 marks "no ground truth".
    precision = evaluator.eval["precision"]
    for k, cat_id in enumerate(evaluator.params.catIds):
        for name, iou_slice in (("AP", slice(None)), ("AP50", slice(0, 1))):
            p = precision[iou_slice, :, k, 0, -1]
            p = p[p > -1]
            out[f"{iou_type}_{name}_class{cat_id}"] = float(p.mean()) if p.size else float("nan")
    return out


def _zero_metrics(iou_type: str) -> dict[str, float]:
    out = {f"{iou_type}_{m}": 0.0 for m in METRICS}
    for c in range(1, NUM_CLASSES + 1):
        out[f"{iou_type}_AP_class{c}"] = 0.0
        out[f"{iou_type}_AP50_class{c}"] = 0.0
    return out
