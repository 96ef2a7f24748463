from __future__ import annotations

import json

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from coco import build_coco_gt, detections_to_coco, encode_packed, evaluate, mask_util, packed_rles, rle_runs
from dataloader import Instances
from masks import PackedMasks


def _instances() -> Instances:
    crops = [np.ones((4, 5), bool), np.ones((3, 3), bool)]
    crops[1][0, 0] = False
    return Instances(labels=np.array([1, 3]), boxes=np.array([[2, 1, 7, 5], [10, 10, 13, 13]]),
                     crops=crops, height=20, width=16)


def _perfect_output(inst: Instances) -> dict:
    return {"boxes": torch.from_numpy(inst.boxes).float(), "labels": torch.from_numpy(inst.labels),
            "scores": torch.tensor([0.9, 0.8]), "masks": PackedMasks.from_crops(inst.crops, inst.boxes, (20, 16)),
            "image_size": (inst.height, inst.width)}


def test_perfect_predictions_score_one() -> None:
    inst = _instances()
    gt = build_coco_gt([inst], [7])
    results = detections_to_coco(_perfect_output(inst), 7)
    metrics = evaluate(gt, results)
    for key in ("segm_AP", "segm_AP50", "segm_AP75", "bbox_AP50"):
        assert abs(metrics[key] - 1.0) < 1e-6, key
    assert abs(metrics["segm_AP50_class3"] - 1.0) < 1e-6
    assert np.isnan(metrics["segm_AP50_class2"])  # no ground truth of class 2


def test_no_predictions_give_zeros_not_crash() -> None:
    gt = build_coco_gt([_instances()], [7])
    metrics = evaluate(gt, [])
    assert metrics["segm_AP50"] == 0.0 and metrics["bbox_AP"] == 0.0
    assert metrics["segm_AP50_class1"] == 0.0 and metrics["segm_AP50_class3"] == 0.0
    # a class without ground truth is NaN with or without detections, as COCOeval says
    one = detections_to_coco(_perfect_output(_instances()), 7)[:1]
    for found in (metrics, evaluate(gt, one)):
        assert np.isnan(found["segm_AP50_class2"]) and np.isnan(found["bbox_AP_class4"])


def test_results_are_a_valid_submission(tmp_path) -> None:
    inst = _instances()
    results = detections_to_coco(_perfect_output(inst), 7)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    loaded = json.loads(path.read_text())
    assert set(loaded[0]) == {"image_id", "category_id", "bbox", "score", "segmentation"}
    assert loaded[0]["segmentation"]["size"] == [20, 16] and isinstance(loaded[0]["segmentation"]["counts"], str)
    assert loaded[0]["bbox"] == [2.0, 1.0, 5.0, 4.0]
    gt = COCO()  # the submission contract is pycocotools' loader, whatever scores it here
    gt.dataset = {"images": [{"id": 7, "height": 20, "width": 16}], "annotations": [],
                  "categories": [{"id": c} for c in range(1, 5)]}
    gt.createIndex()
    dt = gt.loadRes(str(path))
    assert isinstance(dt, COCO) and len(dt.getAnnIds()) == 2
    evaluate(build_coco_gt([inst], [7]), results)
    assert "id" not in results[0]  # evaluate/loadRes must not have mutated our dicts


def test_gt_areas_are_mask_pixels() -> None:
    gt = build_coco_gt([_instances()], [7])
    assert sorted(a["area"] for a in gt.dataset["annotations"]) == [8.0, 20.0]


def test_packed_encoding_equals_full_mask_encoding() -> None:
    from pycocotools import mask as mask_util

    rng = np.random.default_rng(0)
    for _ in range(20):  # crops touching every border, empty and full crops included
        height, width = (int(v) for v in rng.integers(3, 30, 2))
        crops, boxes = [], []
        for _ in range(10):
            h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
            y0, x0 = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            crops.append(rng.random((h, w)) < rng.choice([0.0, 0.3, 0.9, 1.0]))
            boxes.append([x0, y0, x0 + w, y0 + h])
        packed = PackedMasks.from_crops(crops, np.array(boxes), (height, width))
        expected = mask_util.encode(np.asfortranarray(packed.full().numpy().transpose(1, 2, 0)))
        got = encode_packed(packed, height, width)
        assert [g["counts"] for g in got] == [e["counts"] for e in expected]
        assert all(list(g["size"]) == [height, width] for g in got)


def test_scores_equal_pycocotools() -> None:
    rng = np.random.default_rng(0)
    instances, ids, results = [], [], []
    for image_id in range(1, 4):
        crops = [rng.random((int(h), int(w))) < 0.8 for h, w in rng.integers(3, 9, (6, 2))]
        boxes = np.array([[x, y, x + c.shape[1], y + c.shape[0]] for c, (x, y) in zip(crops, rng.integers(0, 20, (6, 2)))])
        inst = Instances(labels=rng.integers(1, 5, 6), boxes=boxes, crops=crops, height=30, width=32)
        instances.append(inst)
        ids.append(image_id)
        noisy = inst.masks() * (rng.random((6, 30, 32)) > 0.2)
        masks = PackedMasks.from_crops(list(noisy), np.tile([0, 0, 32, 30], (6, 1)), (30, 32))
        results += detections_to_coco({"boxes": torch.from_numpy(boxes).float() + 1, "image_size": (30, 32),
                                       "labels": torch.from_numpy(inst.labels), "masks": masks,
                                       "scores": torch.from_numpy(rng.random(6)).float()}, image_id)
    ours = evaluate(build_coco_gt(instances, ids), results)
    gt = COCO()
    gt.dataset = build_coco_gt(instances, ids).dataset
    gt.createIndex()
    reference = COCOeval(gt, gt.loadRes([dict(r) for r in results]), "segm")
    reference.evaluate()
    reference.accumulate()
    reference.summarize()
    assert 0 < ours["segm_AP"] < 1
    for key, index in (("segm_AP", 0), ("segm_AP50", 1), ("segm_AP75", 2)):
        assert abs(ours[key] - reference.stats[index]) < 1e-6, key


def test_rle_runs_read_coco_strings_as_coco_writes_them() -> None:
    """Run lengths of random masks' compressed strings equal the masks' own runs (column-major,
    background first), and strings COCO's reader refuses give None."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        height, width = (int(v) for v in rng.integers(1, 70, 2))
        mask = np.asfortranarray(rng.random((height, width)) < rng.random())
        flat = mask.flatten(order="F")
        runs = np.diff(np.r_[0, np.flatnonzero(np.diff(flat)) + 1, flat.size])
        runs = np.r_[0, runs] if flat[0] else runs
        counts = mask_util.encode(mask.astype(np.uint8))["counts"].decode("ascii")
        assert rle_runs(counts).tolist() == runs.tolist()
    assert rle_runs("zzzz!!") is None and rle_runs("0\x7f") is None and rle_runs("").size == 0
    assert rle_runs("1" + chr(48 + 0x20)) is None  # a number cut short by the string's end
    assert rle_runs("o" * 13 + "0") is None  # a number of 13 characters: more than any image holds
    assert rle_runs("\u00e90") is None  # a non-ASCII character ('?' once replaced is a digit)
    assert rle_runs(b"0`<").tolist() == rle_runs("0`<").tolist() == [0, 400]  # pycocotools' bytes too


def test_packed_rles_crop_each_mask_as_decoding_it_would() -> None:
    rng = np.random.default_rng(1)
    masks = np.zeros((40, 60, 45), np.uint8)
    for mask in masks[:-1]:  # the last one empty
        y, x = (int(v) for v in rng.integers(0, 40, 2))
        mask[y:y + int(rng.integers(1, 12)), x:x + int(rng.integers(1, 8))] = 1
        mask[rng.random(mask.shape) < 0.01] = 1  # specks far from the cell: the box spans them
    rles = [mask_util.encode(np.asfortranarray(m)) for m in masks]
    packed = packed_rles([{**r, "counts": r["counts"].decode("ascii")} for r in rles], 60, 45)
    assert np.array_equal(packed.full().numpy().astype(bool), masks.astype(bool))
    assert packed.boxes[-1].tolist() == [0, 0, 0, 0]
