"""Seconds to score a validation set with segm COCOeval: pycocotools vs faster-coco-eval.

The ground truth (dense, cell-like ellipses) is built once per library and not timed with
the evaluation; the detections are the ground truth perturbed (shifted, resized, some
relabelled, some missed) plus false positives, so the AP is far from 0 and 1. Each timed run
is what ``coco.evaluate`` does for segm: ``loadRes`` + ``evaluate`` + ``accumulate`` +
``summarize``. The 12 summary stats and the per-class APs that ``coco.py`` derives from the
precision array must agree.

    python benchmarks/evaluation.py                  # 101 images x 500 detections
    pip install faster-coco-eval                     # needed for the second column
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import io  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import numpy as np  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from benchmarks.common import base_parser, environment, print_table, ratio, setup, timed, write_results  # noqa: E402
from coco import _named_metrics, build_coco_gt, encode_packed  # noqa: E402
from dataloader import NUM_CLASSES, Instances  # noqa: E402
from masks import PackedMasks  # noqa: E402

NAME = "evaluation"
STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
              "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")
TOLERANCE = 1e-6


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__)
    parser.add_argument("--images", type=int, default=101)
    parser.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    parser.add_argument("--gt_per_image", type=int, default=150, help="ground-truth cells per image (real mean: 137)")
    parser.add_argument("--dets_per_image", type=int, default=500, help="detections per image")
    parser.add_argument("--recall", type=float, default=0.8, help="share of ground truth that gets a detection")
    parser.add_argument("--max_dets", type=int, default=100, help="COCOeval maxDets[-1], as --eval_max_dets in training")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per library (the fastest is reported)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = setup(args)
    rng = np.random.default_rng(args.seed)
    instances = [_ground_truth(rng, args) for _ in range(args.images)]
    ids = list(range(1, args.images + 1))
    results = [d for inst, image_id in zip(instances, ids) for d in _detections(rng, inst, image_id, args)]
    gt, gt_seconds = timed(lambda: build_coco_gt(instances, ids))
    rows = [_measure("pycocotools", lambda: pycocotools_eval(gt, results, args.max_dets), gt_seconds, args.repeats)]
    fast = _faster_coco_eval()
    if fast is not None:
        fast_gt, fast_gt_seconds = timed(lambda: fast_ground_truth(fast, gt))
        for workers, label in ((None, "faster-coco-eval"), (1, "faster-coco-eval (1 thread)")):
            run = lambda: faster_eval(fast, fast_gt, results, args.max_dets, workers)  # noqa: E731
            rows.append(_measure(label, run, fast_gt_seconds, args.repeats))
    payload = summarize(args, device, rows, len(results), fast)
    write_results(args, NAME, payload)
    return payload


def pycocotools_eval(gt: COCO, results: list[dict], max_dets: int) -> COCOeval:
    """What ``coco.evaluate`` runs for segm, returning the evaluator."""
    with contextlib.redirect_stdout(io.StringIO()):
        detections = gt.loadRes([dict(r) for r in results])
        evaluator = COCOeval(gt, detections, "segm")
        evaluator.params.maxDets = [1, 10, max_dets]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def fast_ground_truth(fast: Any, gt: COCO) -> Any:
    """faster-coco-eval's COCO from the same ground-truth dataset dict."""
    fast_gt = fast.COCO()
    fast_gt.dataset = copy.deepcopy(gt.dataset)
    fast_gt.createIndex()
    return fast_gt


def faster_eval(fast: Any, gt: Any, results: list[dict], max_dets: int, workers: int | None) -> Any:
    """The same evaluation with faster-coco-eval's drop-in classes (C++ evaluate/accumulate;
    RLE IoUs on up to ``workers`` threads, its default when None)."""
    detections = gt.loadRes([dict(r) for r in results])
    options = {} if workers is None else {"rle_iou_max_workers": workers}
    evaluator = fast.COCOeval_faster(gt, detections, "segm", print_function=lambda *a, **k: None, **options)
    evaluator.params.maxDets = [1, 10, max_dets]
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator


def summarize(args: argparse.Namespace, device: Any, rows: list[dict], n_results: int, fast: Any) -> dict[str, Any]:
    reference = rows[0]
    for row in rows:
        row["speedup"] = ratio(reference["eval_seconds"], row["eval_seconds"])
        diffs = np.abs(np.asarray(row["stats"][:12]) - np.asarray(reference["stats"][:12]))
        row["max_stat_diff"] = float(diffs.max())
        row["stats_agree"] = bool(diffs.max() <= TOLERANCE)
        row["class_metrics_agree"] = _same_metrics(row["metrics"], reference["metrics"])
    print_table(f"segm COCOeval: {args.images} images x {args.dets_per_image} detections "
                f"({n_results} results, {args.gt_per_image} ground truth/image, maxDets {args.max_dets})",
                rows, ["library", "eval_seconds", "speedup", "gt_build_seconds", "stats_agree", "max_stat_diff",
                       "class_metrics_agree"])
    print("stats: " + ", ".join(f"{n} {v:.4f}" for n, v in zip(STAT_NAMES, reference["stats"])))
    main_fast = next((r for r in rows if r["library"] == "faster-coco-eval"), None)
    targets = {"faster_installed": fast is not None,
               "all_12_stats_agree": main_fast["stats_agree"] if main_fast else None,
               "faster": main_fast["speedup"] > 1.0 if main_fast else None}
    print(f"targets met: {targets}")
    return {"benchmark": NAME, "environment": environment(device),
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "faster_coco_eval_version": getattr(fast, "__version__", None), "stat_names": list(STAT_NAMES),
            "rows": rows, "targets_met": targets}


def _measure(library: str, run: Callable[[], Any], gt_seconds: float, repeats: int) -> dict[str, Any]:
    times, evaluator = [], None
    for _ in range(max(repeats, 1)):
        evaluator, seconds = timed(run)
        times.append(seconds)
    return {"library": library, "eval_seconds": min(times), "all_seconds": times, "gt_build_seconds": gt_seconds,
            "stats": [float(s) for s in evaluator.stats[:12]], "metrics": _named_metrics(evaluator, "segm")}


def _ground_truth(rng: np.random.Generator, args: argparse.Namespace) -> Instances:
    """Cell-like ellipses with random classes (overlaps allowed), sized so that all three
    COCO area ranges occur, as in the real data (box sides 13-63 px)."""
    height, width = args.size
    labels, boxes, crops = [], [], []
    for _ in range(args.gt_per_image):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = _radii(rng)
        box, crop = _ellipse(cy, cx, ry, rx, height, width)
        if crop is not None:
            labels.append(int(rng.integers(1, NUM_CLASSES + 1)))
            boxes.append(box)
            crops.append(crop)
    return Instances(labels=np.asarray(labels, dtype=np.int64), boxes=np.asarray(boxes, dtype=np.int64).reshape(-1, 4),
                     crops=crops, height=height, width=width)


def _detections(rng: np.random.Generator, inst: Instances, image_id: int, args: argparse.Namespace) -> list[dict]:
    """Perturbed ground truth (higher scores) plus false positives (lower scores)."""
    out = []
    for label, (x1, y1, x2, y2) in zip(inst.labels, inst.boxes):
        if len(out) >= args.dets_per_image or rng.random() > args.recall:
            continue
        cy, cx = (y1 + y2) / 2 + rng.normal(0, 1.5), (x1 + x2) / 2 + rng.normal(0, 1.5)
        ry, rx = (y2 - y1) / 2 * rng.uniform(0.8, 1.2), (x2 - x1) / 2 * rng.uniform(0.8, 1.2)
        label = int(label) if rng.random() < 0.9 else int(rng.integers(1, NUM_CLASSES + 1))
        result = _result(image_id, label, float(rng.uniform(0.3, 1.0)), cy, cx, ry, rx, inst)
        if result is not None:
            out.append(result)
    while len(out) < args.dets_per_image:
        cy, cx = rng.uniform(0, inst.height), rng.uniform(0, inst.width)
        ry, rx = _radii(rng)
        result = _result(image_id, int(rng.integers(1, NUM_CLASSES + 1)), float(rng.uniform(0.0, 0.8)), cy, cx, ry, rx, inst)
        if result is not None:
            out.append(result)
    return out


def _result(image_id: int, label: int, score: float, cy: float, cx: float, ry: float, rx: float,
            inst: Instances) -> dict | None:
    (x1, y1, x2, y2), crop = _ellipse(cy, cx, ry, rx, inst.height, inst.width)
    if crop is None:
        return None
    rle = encode_packed(PackedMasks.from_crops([crop], np.array([[x1, y1, x2, y2]]), (inst.height, inst.width)),
                        inst.height, inst.width)[0]
    return {"image_id": image_id, "category_id": label, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": round(score, 5),
            "segmentation": {"size": [inst.height, inst.width], "counts": rle["counts"].decode("ascii")}}


def _radii(rng: np.random.Generator) -> np.ndarray:
    """Mostly small cells, a few large ones (areas up to ~3000 px: medium in COCO terms)."""
    return rng.uniform(4, 14, size=2) if rng.random() < 0.85 else rng.uniform(14, 32, size=2)


def _ellipse(cy: float, cx: float, ry: float, rx: float, height: int, width: int
             ) -> tuple[tuple[int, int, int, int], np.ndarray | None]:
    """Box (exclusive max) and boolean crop of an ellipse clipped to the image; None if empty."""
    y0, y1 = max(int(cy - ry), 0), min(int(cy + ry) + 1, height)
    x0, x1 = max(int(cx - rx), 0), min(int(cx + rx) + 1, width)
    if y1 <= y0 or x1 <= x0:
        return (0, 0, 0, 0), None
    yy, xx = np.mgrid[y0:y1, x0:x1]
    inside = ((yy + 0.5 - cy) / ry) ** 2 + ((xx + 0.5 - cx) / rx) ** 2 <= 1.0
    if not inside.any():
        return (0, 0, 0, 0), None
    rows, cols = np.nonzero(inside.any(axis=1))[0], np.nonzero(inside.any(axis=0))[0]
    crop = inside[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    return (x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1), crop


def _same_metrics(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(
        (np.isnan(a[k]) and np.isnan(b[k])) or abs(a[k] - b[k]) <= TOLERANCE for k in a)


def _faster_coco_eval() -> Any:
    try:
        import faster_coco_eval
    except ImportError:
        print("faster-coco-eval is not installed (pip install faster-coco-eval); measuring pycocotools only")
        return None
    return faster_coco_eval


if __name__ == "__main__":
    main()
