from __future__ import annotations

import json

import numpy as np
import torch
from pycocotools.coco import COCO

from coco import build_coco_gt, evaluate, outputs_to_coco
from dataloader import Instances


def _instances() -> Instances:
    crops = [np.ones((4, 5), bool), np.ones((3, 3), bool)]
    crops[1][0, 0] = False
    return Instances(labels=np.array([1, 3]), boxes=np.array([[2, 1, 7, 5], [10, 10, 13, 13]]),
                     crops=crops, height=20, width=16)


def _perfect_output(inst: Instances) -> dict:
    masks = torch.from_numpy(inst.masks()).float()[:, None]
    return {"boxes": torch.from_numpy(inst.boxes).float(), "labels": torch.from_numpy(inst.labels),
            "scores": torch.tensor([0.9, 0.8]), "masks": masks}


def test_perfect_predictions_score_one() -> None:
    inst = _instances()
    gt = build_coco_gt([inst], [7])
    results = outputs_to_coco(_perfect_output(inst), 7)
    metrics = evaluate(gt, results)
    for key in ("segm_AP", "segm_AP50", "segm_AP75", "bbox_AP50"):
        assert abs(metrics[key] - 1.0) < 1e-6, key
    assert abs(metrics["segm_AP50_class3"] - 1.0) < 1e-6
    assert np.isnan(metrics["segm_AP50_class2"])  # no ground truth of class 2


def test_no_predictions_give_zeros_not_crash() -> None:
    metrics = evaluate(build_coco_gt([_instances()], [7]), [])
    assert metrics["segm_AP50"] == 0.0 and metrics["bbox_AP"] == 0.0


def test_results_are_a_valid_submission(tmp_path) -> None:
    inst = _instances()
    results = outputs_to_coco(_perfect_output(inst), 7)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    loaded = json.loads(path.read_text())
    assert set(loaded[0]) == {"image_id", "category_id", "bbox", "score", "segmentation"}
    assert loaded[0]["segmentation"]["size"] == [20, 16] and isinstance(loaded[0]["segmentation"]["counts"], str)
    assert loaded[0]["bbox"] == [2.0, 1.0, 5.0, 4.0]
    gt = build_coco_gt([inst], [7])
    dt = gt.loadRes(str(path))
    assert isinstance(dt, COCO) and len(dt.getAnnIds()) == 2
    assert "id" not in results[0]  # evaluate/loadRes must not have mutated our dicts


def test_gt_areas_are_mask_pixels() -> None:
    gt = build_coco_gt([_instances()], [7])
    assert sorted(a["area"] for a in gt.dataset["annotations"]) == [8.0, 20.0]
