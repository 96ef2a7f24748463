"""cell_types: shape and stain measurements of cells, the classifier over them, and the rescoring."""
from __future__ import annotations

import math

import numpy as np
import torch

from benchmarks.cell_types import FEATURES, CellTypeClassifier, cell_features, rescored


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    return ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1


def test_features_measure_shape_and_stain_of_each_cell_alone() -> None:
    image = torch.full((3, 64, 80), 0.9)
    disc, rod = _ellipse(64, 80, 20, 20, 8, 8), _ellipse(64, 80, 40, 55, 3, 15)
    image[:, disc] = 0.2  # a dark round nucleus and a pale elongated one
    image[:, rod] = 0.6
    masks = torch.stack([disc, rod, torch.zeros(64, 80, dtype=torch.bool)])
    features = cell_features(image, masks)
    assert features.shape == (3, FEATURES) and torch.isfinite(features).all()  # an empty mask stays finite
    assert math.isclose(float(features[0, 0]), math.log(float(disc.sum())), rel_tol=1e-5)
    assert features[0, 1] > 0.95 and 0.15 < features[1, 1] < 0.25  # elongation: minor / major axis, 3 / 15
    assert features[0, 4] > 0.9 and features[1, 4] > 0.9  # ellipses fill their moment ellipse
    assert torch.allclose(features[0, 7:10], torch.full((3,), 0.2))  # mean RGB inside the cell
    density = -math.log(0.2) + math.log(0.9)  # the dark cell against its pale surroundings
    assert torch.allclose(features[0, 16:19], torch.full((3,), density), atol=1e-4)
    alone = torch.cat([cell_features(image, masks[k:k + 1]) for k in range(3)])  # batching mixes no cells
    assert torch.allclose(alone, features, atol=1e-5)
    assert torch.allclose(cell_features(image, masks, chunk=2), features, atol=1e-5)  # nor does chunking
    assert cell_features(image, masks[:0]).shape == (0, FEATURES)
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(80.0), indexing="ij")
    u, v = (xs - 40 + ys - 32) / math.sqrt(2), (xs - 40 - ys + 32) / math.sqrt(2)  # the rod turned by 45 degrees
    diagonal = cell_features(image, ((u / 15) ** 2 + (v / 3) ** 2 <= 1)[None])[0]
    assert 0.15 < diagonal[1] < 0.25  # the cross moment counts: a turned rod is as elongated
    assert abs(float(diagonal[2]) - math.log(15 ** 2 / 4)) < 0.1  # the variance along the major axis: a^2 / 4


def test_classifier_learns_separable_cells_the_same_way_each_time() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (300,), generator=generator)
    features = torch.randn(300, FEATURES, generator=generator) * 0.3
    features[:, 0] += labels * 2.0  # size tells the classes apart, on a scale far from 1
    features[:, 0] *= 50
    first, second = CellTypeClassifier(3), CellTypeClassifier(3)
    first.fit(features, labels, steps=200)
    second.fit(features, labels, steps=200)
    with torch.no_grad():
        probs = first(features)
        assert torch.allclose(probs.sum(1), torch.ones(300))
        assert (probs.argmax(1) == labels).float().mean() > 0.95
        assert torch.equal(probs, second(features))  # seeded: one training set, one classifier


def test_rescoring_multiplies_each_score_by_its_class_probability() -> None:
    scores = torch.tensor([0.9, 0.8, 0.7])
    labels = torch.tensor([1, 2, 2])  # 1-based, as detections carry them
    probs = torch.tensor([[0.1, 0.9], [0.2, 0.8], [0.9, 0.1]])
    assert torch.allclose(rescored(scores, labels, probs), torch.tensor([0.09, 0.64, 0.07]))
    assert torch.equal(rescored(scores, labels, probs, power=0.0), scores)


def test_benchmark_rescores_each_detection_by_its_own_mask_and_class(tmp_path) -> None:
    from benchmarks.accuracy import types_rescored
    from dataloader import LabelledImages
    from faster_coco_eval.core import mask as mask_util
    from synthetic import make_dataset

    data = make_dataset(tmp_path, n_train=1, n_test=0, size=(48, 80), cells=(3, 5), seed=2)  # not square
    dataset = LabelledImages(sorted(data["train_dir"].iterdir()), [7])
    wide, tall = torch.zeros(48, 80, dtype=torch.bool), torch.zeros(48, 80, dtype=torch.bool)
    wide[10:14, 5:45], tall[2:40, 60:63] = True, True

    def rle(mask: torch.Tensor) -> dict:
        return mask_util.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))

    results = [{"image_id": 7, "category_id": 2, "score": 0.8, "segmentation": rle(wide)},
               {"image_id": 7, "category_id": 1, "score": 0.5, "segmentation": rle(tall)}]

    seen = []

    class Recorder(torch.nn.Module):  # known probabilities, one row per detection, in the results' order
        def forward(self, features: torch.Tensor) -> torch.Tensor:
            seen.append(features)
            return torch.tensor([[0.9, 0.1], [0.3, 0.7]])

    out = types_rescored(results, Recorder(), dataset)
    assert [round(r["score"], 6) for r in out] == [0.08, 0.15]  # 0.8 x p(class 2 | wide), 0.5 x p(class 1 | tall)
    assert [(r["image_id"], r["category_id"], r["segmentation"]) for r in out] == [
        (r["image_id"], r["category_id"], r["segmentation"]) for r in results]
    image, _ = dataset.raw(0)
    assert torch.allclose(seen[0], cell_features(image, torch.stack([wide, tall])))  # each its own mask
