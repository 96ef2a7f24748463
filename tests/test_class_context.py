"""--class_context: scores weighed by the neighbours' classes, one rescoring for the predictor
and for the benchmark that measures it."""
from __future__ import annotations

import argparse
import math

import pytest
import torch
from torchvision.ops import box_iou

import class_context
from class_context import SAME_CELL, rescore
from coco import detections_to_coco
from predictor import Settings, class_count, predict_images
from test_prediction import CellOracle, _scene


def _one_at_a_time(boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, classes: int,
                   strength: float, reach: float) -> list[float]:
    """The formula of ``class_context``'s docstring, one detection and one neighbour at a time."""
    out = []
    iou = box_iou(boxes, boxes)
    for k in range(len(scores)):
        cx, cy = (boxes[k, 0] + boxes[k, 2]) / 2, (boxes[k, 1] + boxes[k, 3]) / 2
        radius = reach * math.sqrt(float((boxes[k, 2] - boxes[k, 0]) * (boxes[k, 3] - boxes[k, 1])))
        evidence, cell = [0.0] * classes, [0.0] * classes
        for j in range(len(scores)):
            c = int(labels[j]) - 1
            if iou[k, j] >= SAME_CELL:
                cell[c] += float(scores[j])
                continue
            dx, dy = (boxes[j, 0] + boxes[j, 2]) / 2 - cx, (boxes[j, 1] + boxes[j, 3]) / 2 - cy
            evidence[c] += math.exp(-float(dx * dx + dy * dy) / (2 * radius ** 2)) * float(scores[j])
        prior = [((e + 1 / classes) / (sum(evidence) + 1)) ** strength for e in evidence]
        expected = sum(m * p for m, p in zip(cell, prior)) / sum(cell)
        out.append(float(scores[k]) * prior[int(labels[k]) - 1] / expected)
    return out


@pytest.mark.parametrize("chunk", [1024, 7])
def test_rescore_equals_the_formula_one_detection_at_a_time(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(class_context, "CHUNK", chunk)  # chunks of rows change nothing
    g = torch.Generator().manual_seed(0)
    corners = torch.rand(40, 2, generator=g) * 200
    boxes = torch.cat([corners, corners + 8 + torch.rand(40, 2, generator=g) * 20], dim=1)
    boxes = torch.cat([boxes, boxes[:10] + 1.0])  # overlapping hypotheses of the same cells
    labels = torch.randint(1, 5, (50,), generator=g)
    scores = torch.rand(50, generator=g)
    got = rescore(boxes, labels, scores, 4, 1.5, 2.0)
    assert torch.allclose(got, torch.tensor(_one_at_a_time(boxes, labels, scores, 4, 1.5, 2.0)), rtol=1e-4)
    assert torch.equal(rescore(boxes, labels, scores, 4, 0.0), scores)
    assert len(rescore(boxes[:0], labels[:0], scores[:0], 4, 1.0)) == 0


def test_a_cell_among_others_of_a_class_moves_its_score_to_that_class() -> None:
    # a 3 x 3 grid of class-1 cells, and in the middle one cell with a class-2 hypothesis scoring
    # higher than its class-1 one; far away, a lone cell with the same two hypotheses
    grid = [(x, y) for x in (0, 30, 60) for y in (0, 30, 60) if (x, y) != (30, 30)]
    corners = grid + [(30, 30)] * 2 + [(500, 500)] * 2
    boxes = torch.tensor([[x, y, x + 12, y + 12] for x, y in corners], dtype=torch.float32)
    labels = torch.tensor([1] * 8 + [2, 1, 2, 1])
    scores = torch.tensor([0.9] * 8 + [0.6, 0.4, 0.6, 0.4])
    out = rescore(boxes, labels, scores, 4, 1.0)
    assert out[9] > out[8]  # the neighbours turn the middle cell's ranking to class 1
    assert float(out[8] + out[9]) == pytest.approx(1.0)  # the cell keeps its total, moved between classes
    assert torch.allclose(out[10:], scores[10:])  # a lone cell: no neighbours, nothing moves
    assert torch.allclose(out[:8], scores[:8])  # a cell with one hypothesis has nothing to move


def test_predictor_and_benchmark_rescore_the_same_merged_cells() -> None:
    from benchmarks.accuracy import context_rescored, post_name, post_settings

    oracle = CellOracle()
    oracle.num_classes = 4
    images = [_scene(5, (200, 260), 60), _scene(6, (150, 120), 30)]
    settings = Settings(tile=96, tile_overlap=0.4, batch_size=3)
    plain = predict_images(oracle, images, settings)
    asked = post_settings("tile+ctx2r4+cls50", 96)  # accuracy.py's name for the same prediction
    assert asked == {"tile": 96, "tile_overlap": 0.25, "class_context": 2.0, "context_reach": 4.0,
                     "detections_per_class": 50}
    assert post_settings("tile+ctx0.5", 96)["context_reach"] == 3.0
    assert post_settings("tile+tta+best", 96)["consensus"] is False
    assert post_settings("tile+tta+consensus+ctx1+cls100", 96) == {  # every addition composes
        "tile": 96, "tile_overlap": 0.25, "tta_scales": (1.0,), "consensus": True, "class_context": 1.0,
        "context_reach": 3.0, "detections_per_class": 100}
    for bad in ("tile+ctx1r", "tile+ctx-1", "tile+ctxnan", "tile+ctx1r0", "tile+ctx1+ctx2",
                "tile+tta+consensus+consensus", "tile+tta+best+consensus"):
        with pytest.raises(argparse.ArgumentTypeError):
            post_name(bad)
    context = predict_images(oracle, images, Settings(tile=96, tile_overlap=0.4, batch_size=3, class_context=2.0,
                                                      context_reach=4.0))
    results = []
    for i, (before, after) in enumerate(zip(plain, context)):
        expected = rescore(before["boxes"], before["labels"], before["scores"], 4, 2.0, 4.0)
        order = torch.argsort(expected, descending=True)
        assert torch.allclose(after["scores"], expected[order])  # the same cells, reordered by the new scores
        assert torch.equal(after["boxes"], before["boxes"][order])
        results.extend(detections_to_coco(before, i + 1))
    assert not torch.equal(context[0]["scores"], plain[0]["scores"])  # cells overlapping as one: scores move

    def key(r: dict) -> tuple:  # a detection: its image, box, class and mask
        return r["image_id"], tuple(r["bbox"]), r["category_id"], r["segmentation"]["counts"]

    benchmark = {key(r): r["score"]
                 for r in context_rescored(results, Settings(class_context=2.0, context_reach=4.0), 4)}
    predicted = [r for i, dets in enumerate(context) for r in detections_to_coco(dets, i + 1)]
    assert len(benchmark) == len(predicted)
    for r in predicted:
        assert benchmark[key(r)] == pytest.approx(r["score"], rel=1e-3)  # same masks, same new scores


def test_rescore_ignores_autocast_and_keeps_a_nan_or_an_empty_box_to_itself() -> None:
    g = torch.Generator().manual_seed(1)
    corners = torch.rand(30, 2, generator=g) * 1500  # large coordinates: distances stay exact
    boxes = torch.cat([corners, corners + 10 + torch.rand(30, 2, generator=g) * 10], dim=1)
    boxes = torch.cat([boxes, boxes + 0.5])
    labels, scores = torch.randint(1, 5, (60,), generator=g), torch.rand(60, generator=g)
    plain = rescore(boxes, labels, scores, 4, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(rescore(boxes, labels, scores, 4, 1.0), plain)  # --use_amp ranks as fp32 does
    broken = scores.clone()
    broken[3] = math.nan
    out = rescore(boxes, labels, broken, 4, 1.0)
    assert out[3].isnan() and out[torch.arange(60) != 3].isfinite().all()  # one NaN stays its own
    boxes[5, 2:] = boxes[5, :2]  # an empty box: no IoU with anything, itself included
    assert torch.isfinite(rescore(boxes, labels, scores, 4, 1.0)).all()


def test_class_count_reads_each_models_classifier_and_takes_an_ensembles_largest() -> None:
    from torch import nn
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    four, one = (maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=n) for n in (5, 2))
    wrapped = nn.Module()
    wrapped.module = four  # what DistributedDataParallel hands over
    assert class_count(one) == 1
    assert class_count([one, wrapped]) == 4  # the context weighs every class any model predicts


def test_benchmark_shares_a_prediction_only_where_scoring_cannot_differ() -> None:
    from benchmarks.accuracy import post_settings, prediction_key

    def key(post: str, n_models: int) -> Settings:
        return prediction_key(Settings(**post_settings(post, 96)), n_models)

    assert key("tile+consensus", 1) == key("tile+best", 1) == key("tile+ctx2", 1) == key("tile", 1)
    assert key("tile+consensus", 2) != key("tile+best", 2)  # an ensemble's copies are averaged
    assert key("tile+tta+consensus", 1) != key("tile+tta+best", 1)  # so are the views'
    assert key("tile+img50", 1) != key("tile", 1)
    class CutOracle(CellOracle):  # a copy cut by its tile's edge scores higher: tile copies differ
        def detect(self, crops: list[torch.Tensor], cap: int, per_class: int = 0) -> tuple[list, list[dict]]:
            state, dets = super().detect(crops, cap, per_class)
            for crop, d in zip(crops, dets):
                b = d["boxes"]
                cut = (b[:, 0] <= 0) | (b[:, 1] <= 0) | (b[:, 2] >= crop.shape[-1]) | (b[:, 3] >= crop.shape[-2])
                d["scores"] = d["scores"] + 0.05 * cut
            return state, dets

    images = [_scene(5, (200, 260), 60)]  # what the shared key claims: one model, tiles and no views
    mean, best = (predict_images(CutOracle(), images, Settings(tile=96, tile_overlap=0.4, consensus=c))[0]
                  for c in (True, False))
    assert torch.equal(mean["scores"], best["scores"]) and torch.equal(mean["boxes"], best["boxes"])
    two = [CutOracle(), CutOracle()]  # two sources: the tile copies' scores now enter the means
    assert not torch.equal(*(predict_images(two, images, Settings(tile=96, tile_overlap=0.4, consensus=c))[0]["scores"]
                             for c in (True, False)))
