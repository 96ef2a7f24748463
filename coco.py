"""The single source of truth for COCO conversion and scoring.

Ground truth comes from the decoded instances, predictions from model outputs; both become
run-length encoded masks, and ``evaluate`` names every metric exactly (AP is AP@[.5:.95]).
"""
from __future__ import annotations

import contextlib
import io
from typing import Iterable, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

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


def outputs_to_coco(output: dict, image_id: int, mask_thresh: float = 0.5, chunk: int = 64) -> list[dict]:
    """One image's model output (already at original size) as COCO results with RLE masks.

    Masks are binarised and encoded in chunks so 1000 full-size masks never sit in memory
    as one array.
    """
    boxes = output["boxes"].detach().float().cpu().numpy()
    scores = output["scores"].detach().float().cpu().numpy()
    labels = output["labels"].detach().cpu().numpy()
    masks = output["masks"]
    results = []
    for start in range(0, len(scores), chunk):
        binary = (masks[start:start + chunk, 0] > mask_thresh).to(torch.uint8).cpu().numpy()
        rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        for offset, rle in enumerate(rles):
            i = start + offset
            x1, y1, x2, y2 = (float(v) for v in boxes[i])
            results.append({
                "image_id": int(image_id),
                "category_id": int(labels[i]),
                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                "score": round(float(scores[i]), 5),
                "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
            })
    return results


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
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.params.maxDets = [1, 10, max_dets]
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        metrics.update(_named_metrics(evaluator, iou_type))
    return metrics


def _named_metrics(evaluator: COCOeval, iou_type: str) -> dict[str, float]:
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
