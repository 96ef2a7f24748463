"""The single source of truth for COCO conversion and scoring.

Ground truth comes from the decoded instances, predictions from model outputs; both become
run-length encoded masks, and ``evaluate`` names every metric exactly (AP is AP@[.5:.95]).
Scoring uses faster-coco-eval, a C++ drop-in for pycocotools' COCOeval: all 12 stats agree to
1e-6 and it is several times faster (the ratio: benchmarks/evaluation.py).
"""
from __future__ import annotations

import contextlib
import io
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster
from faster_coco_eval.core import mask as mask_util  # pycocotools' API, without its numpy-2 DeprecationWarnings
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from torchvision.models.detection import roi_heads

from dataloader import NUM_CLASSES, Instances
from masks import PASTE_PADDING, PackedMasks, paste_boxes, pixel_chunks
from progress import progress

IOU_TYPES = ("segm", "bbox")
METRICS = ("AP", "AP50", "AP75")
CATEGORIES = [{"id": c, "name": f"class{c}"} for c in range(1, NUM_CLASSES + 1)]


def build_coco_gt(instances: Sequence[Instances], image_ids: Sequence[int]) -> COCO:
    """COCO ground truth from cached instances; built once per run, not per epoch."""
    images, annotations = [], []
    for inst, image_id in progress(zip(instances, image_ids), "encode true cells", total=len(instances)):
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


def detections_to_coco(dets: dict, image_id: int) -> list[dict]:
    """One image's merged detections (``predictor.predict_images``: boxes, scores, labels and
    ``masks``, a ``PackedMasks`` of each binary mask inside its box) as COCO results."""
    height, width = dets["image_size"]
    rles = encode_packed(dets["masks"], height, width)
    boxes = dets["boxes"].detach().float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    # One dict per submitted detection: the output format, not a per-detection computation.
    return [{"image_id": int(image_id), "category_id": int(label), "bbox": [round(v, 2) for v in box],
             "score": round(score, 5), "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")}}
            for box, score, label, rle in zip(xywh, dets["scores"].detach().float().cpu().tolist(),
                                              dets["labels"].detach().cpu().tolist(), rles)]


def paste_masks(probs: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int], mask_thresh: float = 0.5,
                chunk_pixels: int = 1 << 23) -> PackedMasks:
    """torchvision's ``paste_masks_in_image`` for all masks at once, but each binary mask kept
    only inside its clipped box (a [K, H, W] float tensor of 1000 masks is gigabytes).

    ``probs`` [K, M, M] are box-relative mask probabilities, ``boxes`` [K, 4] image-pixel
    boxes. The same expanded boxes and bilinear weights as torchvision are computed for every
    pixel of every crop in one batch (chunks of about ``chunk_pixels``), on probs' device.
    """
    height, width = image_size
    padded, _ = roi_heads.expand_masks(probs.detach().float(), padding=PASTE_PADDING)
    full = paste_boxes(boxes.to(padded.device), probs.shape[-1])
    lo = torch.stack([full[:, 0].clamp(min=0), full[:, 1].clamp(min=0)], dim=1)
    hi = torch.maximum(torch.stack([(full[:, 2] + 1).clamp(max=width), (full[:, 3] + 1).clamp(max=height)], dim=1), lo)
    counts = (hi - lo).prod(dim=1)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    pieces = [torch.empty(0, dtype=torch.uint8, device=padded.device)]
    for start, stop, pixels in pixel_chunks(counts, chunk_pixels):
        owner = torch.repeat_interleave(torch.arange(start, stop, device=padded.device), counts[start:stop],
                                        output_size=pixels)
        local = torch.arange(pixels, device=padded.device) + offsets[start] - offsets[owner]
        crop_w = (hi[owner, 0] - lo[owner, 0]).clamp(min=1)
        row = local // crop_w + lo[owner, 1] - full[owner, 1]
        col = local % crop_w + lo[owner, 0] - full[owner, 0]
        box_h = (full[owner, 3] - full[owner, 1] + 1).clamp(min=1)
        box_w = (full[owner, 2] - full[owner, 0] + 1).clamp(min=1)
        value = _bilinear(padded, owner, _source(row, box_h, padded.shape[-2]), _source(col, box_w, padded.shape[-1]))
        pieces.append((value > mask_thresh).to(torch.uint8))
    return PackedMasks(torch.cat(pieces), torch.cat([lo, hi], dim=1), offsets, (height, width))


def _source(index: torch.Tensor, out_len: torch.Tensor, in_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """F.interpolate's bilinear source (align_corners=False) of output ``index`` out of ``out_len``:
    the two input indices and the weight of the second."""
    src = ((index.float() + 0.5) * (in_len / out_len.float()) - 0.5).clamp(min=0.0)
    low = src.floor().to(torch.int64).clamp(max=in_len - 1)
    return low, (low + 1).clamp(max=in_len - 1), src - low.float()


def _bilinear(masks: torch.Tensor, owner: torch.Tensor, rows: tuple, cols: tuple) -> torch.Tensor:
    (r0, r1, wr), (c0, c1, wc) = rows, cols
    top = masks[owner, r0, c0] * (1 - wc) + masks[owner, r0, c1] * wc
    bottom = masks[owner, r1, c0] * (1 - wc) + masks[owner, r1, c1] * wc
    return top * (1 - wr) + bottom * wr


def rle_runs(counts: str | bytes) -> np.ndarray | None:
    """The run lengths of a compressed COCO RLE string (or the bytes pycocotools gives),
    decoded as COCO's ``rleFrString`` does (5 bits a character, a continuation bit, a sign bit,
    each run from the fourth on stored as its difference to the one two before) but vectorised
    over the characters; None where the string is malformed. Checking a submission's masks this
    way costs time in the length of each string, where decoding or merging them costs the
    image's area each."""
    data = counts if isinstance(counts, bytes) else counts.encode("ascii") if counts.isascii() else b"\x00"
    chars = np.frombuffer(data, np.uint8).astype(np.int64) - 48
    if chars.size == 0:
        return np.zeros(0, np.int64)
    if chars.min() < 0 or chars.max() > 63 or chars[-1] & 0x20:  # not RLE characters, or an early end
        return None
    ends = np.flatnonzero(chars & 0x20 == 0)  # the last character of each number
    starts = np.r_[0, ends[:-1] + 1]
    widths = ends - starts + 1
    if widths.max() > 12:  # more than 60 bits: no run of any image
        return None
    place = np.arange(chars.size) - np.repeat(starts, widths)
    values = np.add.reduceat((chars & 0x1F) << (5 * place), starts)
    values -= np.where(chars[ends] & 0x10, np.left_shift(1, 5 * widths), 0)  # negative numbers, sign-extended
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])  # run m (m >= 3) adds run m - 2
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def encode_packed(masks: PackedMasks, height: int, width: int) -> list[dict]:
    """Compressed COCO RLE of every packed mask as a full-image mask, in one pass over the
    crops' pixels (runs are found on the crops only, so the cost does not grow with the
    image) and one pycocotools call."""
    data = masks.data.cpu().numpy().astype(bool)
    boxes = masks.boxes.cpu().numpy()
    offsets = masks.offsets.cpu().numpy()
    n = len(boxes)
    if n == 0:
        return []
    owner = np.repeat(np.arange(n), np.diff(offsets))
    local = np.arange(len(data)) - offsets[owner]
    x0, y0, x1, y1 = (boxes[owner, k] for k in range(4))
    w, h = np.maximum(x1 - x0, 1), y1 - y0
    row, col = local // w, local % w
    index = (x0 + col) * height + y0 + row  # column-major, as COCO RLE counts
    first = data & ~_neighbour(data, row, col, h, w, y0, height, -1)
    last = data & ~_neighbour(data, row, col, h, w, y0, height, 1)
    starts = index[first][np.lexsort((index[first], owner[first]))]
    ends = index[last][np.lexsort((index[last], owner[last]))] + 1
    start_owner = owner[first]
    runs = np.bincount(start_owner, minlength=n)
    counts = _run_counts(starts, ends, runs, height * width)
    pieces = np.split(counts, np.cumsum(2 * runs + 1)[:-1])
    # A mask ending on the last pixel ends on a run of ones, as pycocotools writes it.
    uncompressed = [{"size": [height, width], "counts": c[:-1] if len(c) > 1 and c[-1] == 0 else c} for c in pieces]
    return mask_util.frPyObjects(uncompressed, height, width)


def _neighbour(data: np.ndarray, row: np.ndarray, col: np.ndarray, h: np.ndarray, w: np.ndarray, y0: np.ndarray,
               height: int, step: int) -> np.ndarray:
    """The bit before (``step`` -1) or after (+1) each crop pixel in column-major image order:
    inside the column it is the crop's neighbour; across columns only a crop spanning the
    whole image height continues into the next column."""
    inside = (row + step >= 0) & (row + step < h)
    wraps = ~inside & (h == height) & (y0 == 0) & (col + step >= 0) & (col + step < w)
    flat = np.arange(len(data))
    shifted = np.where(inside, flat + step * w, flat + step * (1 - (h - 1) * w))
    neighbour = np.zeros(len(data), dtype=bool)
    pick = inside | wraps
    neighbour[pick] = data[np.clip(shifted[pick], 0, len(data) - 1)]
    return neighbour


def _run_counts(starts: np.ndarray, ends: np.ndarray, runs: np.ndarray, pixels: int) -> np.ndarray:
    """Per mask, the lengths between [0, s1, e1, ..., sk, ek, pixels], all masks concatenated."""
    n = len(runs)
    seg = 2 * runs + 2
    seg_start = np.cumsum(seg) - seg
    bounds = np.empty(int(seg.sum()), dtype=np.int64)
    bounds[seg_start] = 0
    bounds[seg_start + seg - 1] = pixels
    run_owner = np.repeat(np.arange(n), runs)
    rank = np.arange(len(starts)) - (np.cumsum(runs) - runs)[run_owner]
    bounds[seg_start[run_owner] + 1 + 2 * rank] = starts
    bounds[seg_start[run_owner] + 2 + 2 * rank] = ends
    gaps = np.diff(bounds)
    return np.delete(gaps, (seg_start + seg - 1)[:-1])


def evaluate(coco_gt: COCO, results: list[dict], max_dets: int = 100,
             iou_types: Iterable[str] = IOU_TYPES) -> dict[str, float]:
    """``{iou_type}_{AP|AP50|AP75}`` and per-class ``{iou_type}_AP50_class{c}``; zeros, not a
    crash, when there are no predictions (NaN, as COCOeval gives, for a class without ground
    truth, so an absent class reads the same whether or not anything was detected)."""
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        if not results:
            metrics.update(_zero_metrics(coco_gt, iou_type))
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


def matching_metrics(coco_gt: COCO, results: list[dict], score_thresh: float = 0.5,
                     iou_thresh: float = 0.5, cells: bool = False) -> dict[str, float]:
    """The cell community's scores (StarDist's ``matching``): detections scoring at least
    ``score_thresh``, rasterised so each pixel is one cell's (``rasterise``), matched one to
    one with the true cells of the same class and image at IoU >= ``iou_thresh``; F1,
    precision, recall and panoptic quality (mean matched IoU x F1) over all of them, and F1
    per class (``f1_class{c}``, NaN for a class neither predicted nor present). ``cells``:
    the painted cells whose summed class evidence (``scored_cells``), not one class's score,
    reaches ``score_thresh``."""
    by_image: dict[int, list[dict]] = {}
    for r in results:
        by_image.setdefault(int(r["image_id"]), []).append(r)
    counts: dict[int, np.ndarray] = defaultdict(lambda: np.zeros(3, dtype=np.int64))  # tp, fp, fn per class
    matched_iou = 0.0
    for image_id in progress(coco_gt.getImgIds(), "match cells"):
        info = coco_gt.imgs[image_id]
        if cells:
            preds = scored_cells(by_image.get(image_id, []), info["height"], info["width"], score_thresh)
        else:
            preds = rasterise(by_image.get(image_id, []), info["height"], info["width"], score_thresh)
        truth = coco_gt.imgToAnns.get(image_id, [])
        for c in {int(a["category_id"]) for a in truth} | {int(r["category_id"]) for r in preds}:
            p = [r["segmentation"] for r in preds if r["category_id"] == c]
            g = [a["segmentation"] for a in truth if a["category_id"] == c]
            hits = _one_to_one(p, g, iou_thresh)
            counts[c] += (len(hits), len(p) - len(hits), len(g) - len(hits))
            matched_iou += float(sum(hits))
    tp, fp, fn = (int(v) for v in sum(counts.values(), np.zeros(3, dtype=np.int64)))
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    out = {"f1": _f1(tp, fp, fn), "precision": precision, "recall": recall,
           "pq": (matched_iou / tp if tp else 0.0) * _f1(tp, fp, fn)}
    for c in range(1, NUM_CLASSES + 1):
        out[f"f1_class{c}"] = _f1(*counts[c]) if c in counts else float("nan")
    return out


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / max(2 * tp + fp + fn, 1)


def rasterise(results: list[dict], height: int, width: int, score_thresh: float = 0.5) -> list[dict]:
    """One image's detections scoring at least ``score_thresh`` as non-overlapping cells, best
    score first: a pixel belongs to the best-scoring detection covering it, and one left with
    no pixel is gone. Each is a result dict again (RLE, box, score)."""
    kept, canvas = paint(results, height, width, score_thresh)
    return [cell for _, cell in _canvas_cells(kept, canvas)]


def _canvas_cells(kept: list[dict], canvas: np.ndarray) -> list[tuple[int, dict]]:
    """Each number k of ``canvas`` that has pixels: k - 1 and ``kept[k - 1]`` with those pixels
    as its mask (RLE, box)."""
    height, width = canvas.shape
    crops, boxes, index = [], [], []
    for k, window in enumerate(ndimage.find_objects(canvas), start=1):
        if window is not None:
            crops.append(canvas[window] == k)
            boxes.append([window[1].start, window[0].start, window[1].stop, window[0].stop])
            index.append(k - 1)
    rles = encode_packed(PackedMasks.from_crops(crops, np.array(boxes).reshape(-1, 4), (height, width)), height, width)
    return [(i, {**kept[i], "bbox": [x0, y0, x1 - x0, y1 - y0],
                 "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")}})
            for i, (x0, y0, x1, y1), rle in zip(index, boxes, rles)]


def scored_cells(results: list[dict], height: int, width: int, score_thresh: float = 0.0) -> list[dict]:
    """One image's detections as non-overlapping cells (``rasterise`` of them all), each scored
    by the evidence of all its class hypotheses (``cell_evidence``); those whose evidence reaches
    ``score_thresh``. The cell keeps its best class; ``class_score`` is that class's score,
    ``score`` the evidence."""
    kept = sorted(results, key=lambda r: -r["score"])
    masks = packed_rles([r["segmentation"] for r in kept], height, width)
    labels = np.array([int(r["category_id"]) for r in kept], dtype=np.int64)
    scores = np.array([float(r["score"]) for r in kept])
    order, canvas, evidence = cell_evidence(masks, labels, scores, (height, width))
    assert np.array_equal(order, np.arange(len(kept)))  # already best first
    return [{**cell, "score": float(evidence[i + 1]), "class_score": cell["score"]}
            for i, cell in _canvas_cells(kept, canvas) if evidence[i + 1] >= score_thresh]


def cell_evidence(masks: PackedMasks, labels: np.ndarray, scores: np.ndarray, shape: tuple[int, int],
                  floor: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How sure the model is that each painted cell is a cell, whatever its class: ``order``
    (best score first; detections scoring under ``floor`` are left out), the canvas
    ``paint_packed`` paints in that order, and for each canvas number 1 + k the sum over the
    classes of each class's best score among the detections lying at least half on cell k's
    pixels (the cell's own detection always counts), at most 1, rounded as scores are (5 places).

    Why: the classifier spreads one cell's probability over the classes (a softmax), so a cell
    it is sure of but cannot type (0.45 one class, 0.4 another) has no detection at 0.5 and is
    left out of everything kept by score, though it is surely a cell. The classes it confuses
    are mostly the rare ones. Host arrays, every detection's pixels at once: no loop over pairs."""
    order = np.argsort(-scores, kind="stable")
    order = order[scores[order] >= floor]
    canvas = paint_packed(masks, order, shape)
    data, offsets, boxes = masks.data.numpy().astype(bool), masks.offsets.numpy(), masks.boxes.numpy()
    owner = np.repeat(np.arange(len(scores)), np.diff(offsets))  # each crop pixel's detection
    local = np.arange(len(data)) - offsets[owner]
    widths = np.maximum(boxes[:, 2] - boxes[:, 0], 1)
    rows, cols = boxes[owner, 1] + local // widths[owner], boxes[owner, 0] + local % widths[owner]
    present = data & (scores[owner] >= floor)
    owner, rows, cols = owner[present], rows[present], cols[present]
    number = canvas[rows, cols]  # the cell each of a detection's pixels went to
    pairs, counts = np.unique(owner * (len(order) + 1) + number, return_counts=True)
    det, num = np.divmod(pairs, len(order) + 1)
    det, num, counts = det[num > 0], num[num > 0], counts[num > 0]
    first = np.lexsort((-counts, det))  # per detection, the cell holding most of it first
    first = first[np.r_[True, det[first][1:] != det[first][:-1]]] if len(first) else first
    area = np.bincount(owner, minlength=len(scores))
    held = first[2 * counts[first] >= area[det[first]]]
    best = np.zeros((len(order) + 1, NUM_CLASSES + 1))
    np.maximum.at(best, (num[held], labels[det[held]]), scores[det[held]])
    best[np.arange(1, len(order) + 1), labels[order]] = scores[order]  # its own detection: its best class's best
    return order, canvas, np.round(np.minimum(best.sum(1), 1.0), 5)


def paint(results: list[dict], height: int, width: int, score_thresh: float = 0.5) -> tuple[list[dict], np.ndarray]:
    """The detections scoring at least ``score_thresh``, best first, and a canvas holding at
    each pixel 1 + the index of the best one covering it (0: none)."""
    kept = sorted((r for r in results if r["score"] >= score_thresh), key=lambda r: -r["score"])
    masks = packed_rles([r["segmentation"] for r in kept], height, width)
    return kept, paint_packed(masks, np.arange(len(kept)), (height, width))


def packed_rles(segmentations: list[dict], height: int, width: int) -> PackedMasks:
    """COCO RLEs of one image as packed masks (host), each cropped to its box straight from its
    runs (``rle_runs``): decoding each at the image's size cost 0.1 s a cell on a 4096 px image,
    minutes for the cell outputs of one dense image."""
    crops, boxes = [], []
    for segmentation in segmentations:  # on the host, after prediction
        runs = rle_runs(segmentation["counts"])
        ends = np.cumsum(runs)
        starts, lengths = (ends - runs)[1::2], runs[1::2]  # the runs of 1s, column-major
        total = int(lengths.sum())
        if not total:
            crops.append(np.zeros((0, 0), bool))
            boxes.append([0, 0, 0, 0])
            continue
        index = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(total)
        rows, cols = index % height, index // height
        y0, x0 = rows.min(), cols.min()
        crop = np.zeros((rows.max() + 1 - y0, cols.max() + 1 - x0), bool)
        crop[rows - y0, cols - x0] = True
        crops.append(crop)
        boxes.append([x0, y0, x0 + crop.shape[1], y0 + crop.shape[0]])
    return PackedMasks.from_crops(crops, np.array(boxes, dtype=np.int64).reshape(-1, 4), (height, width))


def paint_packed(masks: PackedMasks, order: np.ndarray, shape: tuple[int, int],
                 origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """``paint`` for packed masks (host tensors), never a full-image mask: a canvas of ``shape``
    whose pixel (0, 0) is the image's ``origin`` (y, x), holding at each pixel 1 + k for the
    mask ``order[k]`` (best first) that wins it, 0 where none covers it."""
    data, offsets = masks.data.numpy().astype(bool), masks.offsets.numpy()
    boxes = masks.boxes.numpy() - np.array([origin[1], origin[0], origin[1], origin[0]])
    canvas = np.zeros(shape, dtype=np.int32)
    for k in range(len(order) - 1, -1, -1):  # worst first, so better ones paint over it (host, after prediction)
        i = order[k]
        x0, y0, x1, y1 = boxes[i]
        canvas[y0:y1, x0:x1][data[offsets[i]:offsets[i + 1]].reshape(y1 - y0, x1 - x0)] = k + 1
    return canvas


def _one_to_one(pred: list[dict], truth: list[dict], iou_thresh: float) -> list[float]:
    """IoUs of the optimal one-to-one matching (Hungarian on IoU) that reach ``iou_thresh``."""
    if not pred or not truth:
        return []
    iou = np.asarray(mask_util.iou(pred, truth, [0] * len(truth))).reshape(len(pred), len(truth))
    rows, cols = linear_sum_assignment(-iou)
    return [float(v) for v in iou[rows, cols] if v >= iou_thresh]


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


def _zero_metrics(coco_gt: COCO, iou_type: str) -> dict[str, float]:
    out = {f"{iou_type}_{m}": 0.0 for m in METRICS}
    for c in range(1, NUM_CLASSES + 1):
        value = 0.0 if coco_gt.getAnnIds(catIds=[c]) else float("nan")  # COCOeval's -1: no ground truth
        out[f"{iou_type}_AP_class{c}"] = value
        out[f"{iou_type}_AP50_class{c}"] = value
    return out
