"""Scoring predictions against a folder of ground truth, as a leaderboard does (COCO AP at
maxDets 100, and at 1000 where hundreds of cells fill an image) and as the cell community does
(F1, precision, recall, panoptic quality at IoU 0.5); the library behind ``evaluate.py`` and
``benchmarks/accuracy.py``. Submissions and label images are both read as COCO results.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from coco import CATEGORIES, IOU_TYPES, encode_packed, evaluate, mask_util, matching_metrics, rle_runs
from dataloader import (CLASS_FILES, IMAGE_FILE, few, is_whole, read_id_entries, read_json, read_label_image,
                        sample_name, whole_valued)
from errors import DatasetError
from masks import PackedMasks
from progress import progress

MAX_DETS = (100, 1000)


def score(coco_gt, results: list[dict], score_thresh: float = 0.5, iou_thresh: float = 0.5,
          cells: bool = False) -> dict[str, float]:
    """The flat metric set: COCO AP, AP50, AP75 and AP50 per class at maxDets 100 (plain keys)
    and 1000 (``_1000``), and the matching metrics (F1 also per class; ``cells``: of the cells
    whose summed class evidence reaches ``score_thresh``, ``coco.scored_cells``)."""
    metrics: dict[str, float] = {}
    for max_dets in MAX_DETS:
        suffix = "" if max_dets == 100 else f"_{max_dets}"
        for key, value in evaluate(coco_gt, results, max_dets=max_dets).items():
            if "_AP_class" not in key:
                metrics[f"{key}{suffix}"] = value
    metrics.update(matching_metrics(coco_gt, results, score_thresh, iou_thresh, cells))
    return metrics


def image_ids(samples: list[Path], id_map_json: str | None) -> list[int]:
    if not id_map_json:
        return list(range(1, len(samples) + 1))
    path = Path(id_map_json)
    entries = read_id_entries(path, "pass the id map the submission was written with")
    by_sample = {sample_name(e["file_name"]): e["id"] for e in entries}
    missing = [p.name for p in samples if p.name not in by_sample]
    if missing:
        raise DatasetError(f"{path}: no id for sample(s) {missing[:5]}; each sample X needs an entry 'X.tif' or "
                           f"'X/{IMAGE_FILE}'.")
    return [by_sample[p.name] for p in samples]


def read_submission(path: Path, shapes: dict[int, tuple[int, int]]) -> list[dict]:
    """The results of ``path`` on the images of ``shapes`` (image id: height, width), each checked
    as COCO's loader needs it, so a wrong file stops with the first bad result named rather than
    a traceback from inside the scorer; results of other images are left out."""
    results = read_json(path, "pass inference.py's JSON")
    keys = {"image_id", "category_id", "score", "segmentation"}
    if not isinstance(results, list) or not all(isinstance(r, dict) and keys <= set(r) for r in results):
        raise DatasetError(f"{path}: expected a list of COCO results with {sorted(keys)}; pass inference.py's JSON.")
    for n, r in enumerate(results):
        problem = _result_problem(r)
        fix = "write the submission with inference.py, or as COCO results with RLE masks"
        if not problem:
            _normalise(r)
        if not problem and r["image_id"] in shapes and r["segmentation"]["size"] != list(shapes[r["image_id"]]):
            problem = (f"has a mask of size {r['segmentation']['size']} on an image of "
                       f"{list(shapes[r['image_id']])} (height, width)")
            fix = OTHER_IMAGES  # a well-formed result of another image
        if not problem and r["image_id"] in shapes:  # another image's results are left out, unread
            problem = _mask_problem(r)
        if problem:
            raise DatasetError(f"{path}: result {n} (image_id {r['image_id']!r}) {problem}; {fix}.")
    kept = [r for r in results if r["image_id"] in shapes]
    if results and not kept:
        raise DatasetError(f"{path}: no detection refers to an image of the data folder; {OTHER_IMAGES}.")
    others = sorted({r["image_id"] for r in results} - set(shapes))
    if others:
        print(f"note: {path}: {len(results) - len(kept)} results of image ids not in the data folder "
              f"({few(others)}) are left out")
    for r in kept:
        if "bbox" not in r:  # COCO's loader needs one; the mask's box is the submission's
            x, y, w, h = (float(v) for v in _rle_box(r["segmentation"]))
            r["bbox"] = [x, y, w, h]
    return kept


CATEGORY_IDS = frozenset(c["id"] for c in CATEGORIES)  # the classes a result may name
# What a submission of other images (or of other ids) needs.
OTHER_IMAGES = ("it is of other images, or numbers them otherwise: pass the --data_dir it was predicted on, or "
                "--id_map_json with the ids it was written with")


def unscored_notes(samples: list[Path], ids: list[int], results: list[dict], source: str, fix: str) -> list[str]:
    """Notes on the data folder's images that ``results`` say nothing about: each scores as all
    its cells missed, right for a model that found none, wrong for results of other images
    (``fix``: what to pass then)."""
    found = {r["image_id"] for r in results}
    missing = [s.name for s, i in zip(samples, ids) if i not in found]
    if not results:
        return [f"note: {source} holds no detection: every score is 0"]
    if missing:
        return [f"note: {len(missing)} of {len(samples)} images have no detection in {source} ({few(missing)}): "
                f"each scores as all its cells missed; if that is not what was predicted, {fix}"]
    return []


def _result_problem(result: dict) -> str:
    """What keeps one COCO result from being scored as COCO results are ("" when nothing)."""
    image_id, category, score, mask = (result[k] for k in ("image_id", "category_id", "score", "segmentation"))
    if not whole_valued(image_id):
        return "has an image_id that is not an integer"
    if not whole_valued(category) or category not in CATEGORY_IDS:
        return f"has category_id {category!r}, not one of {sorted(CATEGORY_IDS)}"
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return f"has score {score!r}, not a finite number"
    rle = isinstance(mask, dict) and {"size", "counts"} <= set(mask) and isinstance(mask["counts"], (str, list))
    if not rle:
        return "has a segmentation that is not an RLE {size, counts} (polygons are not scored)"
    if not isinstance(mask["size"], list) or len(mask["size"]) != 2 or not all(map(is_whole, mask["size"])):
        return f"has an RLE size {mask['size']!r}, not [height, width]"
    return ""


def _normalise(result: dict) -> None:
    """``result`` with integer ids, as COCO's loader and our scorer read them."""
    result["image_id"], result["category_id"] = int(result["image_id"]), int(result["category_id"])


def _mask_problem(result: dict) -> str:
    """What keeps a result's RLE from being a mask of its [height, width] ("" when nothing): a
    malformed string, negative runs, or runs that do not add up to height x width (the last makes
    COCO's IoU loop forever). Runs given as a list, as COCO allows, are compressed into the string
    its C code reads. Checked in time that grows with each string (``coco.rle_runs``), not the image."""
    mask = result["segmentation"]
    height, width = mask["size"]
    counts = mask["counts"]
    if isinstance(counts, list):
        try:
            runs = np.array([int(v) for v in counts], np.int64) if all(map(whole_valued, counts)) else None
        except OverflowError:  # a count past 2**63: no image has that many pixels
            runs = None
    else:
        runs = rle_runs(counts)
    if runs is None:
        return "has an RLE whose counts are neither a COCO string nor whole numbers"
    if runs.size and runs.min() < 0:
        return f"has an RLE with a negative run ({int(runs.min())})"
    if runs.sum() != height * width:
        return f"has an RLE mask whose runs cover {int(runs.sum())} pixels, not {height} x {width}"
    if isinstance(counts, list):
        compressed = mask_util.frPyObjects({"size": [height, width], "counts": runs.tolist()}, height, width)
        result["segmentation"] = {"size": [height, width], "counts": compressed["counts"].decode("ascii")}
    return ""


def read_labels(folder: Path, samples: list[Path], ids: list[int], shapes: list[tuple[int, int]]) -> list[dict]:
    """Label images as results: one per instance, scored by its id (inference.py numbers
    cells best first, so id order is score order)."""
    results: list[dict] = []
    found = 0  # label files read: empty ones are a valid prediction of no cell, scoring zero
    for sample, image_id, (height, width) in progress(zip(samples, ids, shapes), "read labels",
                                                      total=len(samples)):
        for class_id, name in CLASS_FILES.items():
            path = folder / sample.name / name
            if not path.exists():
                continue
            found += 1
            label = read_label_image(path, (height, width))
            crops, boxes, values = [], [], []
            for value, window in enumerate(ndimage.find_objects(label), start=1):
                if window is not None:
                    crops.append(label[window] == value)
                    boxes.append([window[1].start, window[0].start, window[1].stop, window[0].stop])
                    values.append(value)
            rles = encode_packed(PackedMasks.from_crops(crops, np.array(boxes).reshape(-1, 4), (height, width)),
                                 height, width)
            results += [{"image_id": image_id, "category_id": class_id, "score": 1.0 / value,
                         "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")}}
                        for value, (x0, y0, x1, y1), rle in zip(values, boxes, rles)]
    if not found:
        raise DatasetError(f"{folder}: no label image of any sample of the data folder; expected "
                           f"{folder}/<sample>/class1.tif ... as inference.py --save_labels writes them.")
    return results


def print_table(metrics: dict[str, float], iou_thresh: float) -> None:
    """The metrics as evaluate.py prints them; ``iou_thresh``: the IoU its F1/PQ matching used."""
    print(f"{'':<8}" + "".join(f"{m:>10}" for m in ("AP", "AP50", "AP75", "AP50@1000")))
    for iou_type in IOU_TYPES:
        row = [metrics[f"{iou_type}_{m}"] for m in ("AP", "AP50", "AP75")] + [metrics[f"{iou_type}_AP50_1000"]]
        print(f"{iou_type:<8}" + "".join(f"{v:>10.4f}" for v in row))
    for label, key in (("segm AP50", "segm_AP50_class{}"), ("segm AP50@1000", "segm_AP50_class{}_1000"),
                       ("F1", "f1_class{}")):
        print(f"{label + ' per class:':<25}" + "  ".join(f"class{c['id']} {metrics[key.format(c['id'])]:.4f}"
                                                      for c in CATEGORIES))
    print(f"matching at IoU {iou_thresh:g}: " + "  ".join(f"{k} {metrics[k]:.4f}" for k in ("f1", "precision", "recall", "pq")))


def _rle_box(segmentation: dict) -> list[float]:
    return list(mask_util.toBbox(segmentation))
