"""``--type_map``: a per-pixel cell-type map whose classes re-weigh each detection's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint import load_model
from conftest import assert_cli_predicts_like_the_model
from masks import PackedMasks
from model import build_model
from predictor import Settings, predict_images
from type_map import TypeMapHead, level_stride, rescore, type_targets

CONFIG = {"weights": "none", "input_scale": 0.0, "min_size": 64, "max_size": 96, "detections_per_img": 30,
          "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100,
          "rpn_post_nms_top_n_train": 100, "box_batch_size_per_image": 32, "type_map": 0.5}


def _cells(generator: np.random.Generator, n: int, height: int, width: int) -> tuple[PackedMasks, torch.Tensor]:
    """``n`` random blobs (each a random subset of its box) as packed masks, and their full stack."""
    crops, boxes, full = [], [], torch.zeros(n, height, width, dtype=torch.uint8)
    for i in range(n):
        x1, y1 = generator.integers(0, width - 8), generator.integers(0, height - 8)
        x2, y2 = x1 + generator.integers(2, 9), y1 + generator.integers(2, 9)
        crop = generator.random((y2 - y1, x2 - x1)) > 0.3
        crop[0, 0] = True  # never empty
        crops.append(crop)
        boxes.append([x1, y1, x2, y2])
        full[i, y1:y2, x1:x2] = torch.from_numpy(crop.astype(np.uint8))
    return PackedMasks.from_crops(crops, np.array(boxes), (height, width)), full


def test_type_targets_equal_the_label_image_painted_cell_by_cell_and_sampled_every_stride() -> None:
    generator = np.random.default_rng(0)
    targets, expected = [], []
    for n in (12, 0, 5):  # an image without cells among them
        packed, full = _cells(generator, n, 40, 56)
        labels = torch.from_numpy(generator.integers(1, 5, n))
        targets.append({"masks": packed, "labels": labels})
        painted = torch.zeros(64, 64, dtype=torch.int64)  # the batch's padded size
        for i in range(n):  # by hand: the highest label where cells overlap (the scatter's amax)
            painted[:40, :56] = torch.maximum(painted[:40, :56], full[i].long() * labels[i])
        expected.append(painted[::4, ::4])
    got = type_targets(targets, (16, 16), 4)
    assert got.shape == (3, 16, 16) and torch.equal(got, torch.stack(expected))
    assert got[0].max() > 0 and got[1].max() == 0
    # torchvision's full [N, H, W] masks give the same map
    full_targets = [{"masks": packed.full(), "labels": t["labels"]} for t, packed in
                    zip(targets, (t["masks"] for t in targets))]
    assert torch.equal(type_targets(full_targets, (16, 16), 4), got)


def test_the_level_stride_comes_from_the_padded_batch() -> None:
    level = torch.zeros(1, 256, 24, 24)  # a 65 px image is padded to 96: stride 4, not 65 / 24
    assert level_stride(level, [(65, 70)]) == 4
    assert level_stride(torch.zeros(1, 256, 64, 64), [(256, 256), (200, 256)]) == 4
    assert level_stride(torch.zeros(1, 256, 32, 32), [(256, 250)]) == 8


def test_rescoring_moves_foreground_between_classes_and_keeps_the_background() -> None:
    probs = torch.tensor([[0.2, 0.5, 0.1, 0.1, 0.1], [0.6, 0.1, 0.1, 0.1, 0.1]])
    logits = torch.full((1, 5, 16, 16), -10.0)
    logits[0, 0] = 0.0
    logits[0, 3, :8, :8] = 10.0  # the map says class 3 in the top-left quarter, background elsewhere
    boxes = [torch.tensor([[0.0, 0.0, 24.0, 24.0], [40.0, 40.0, 60.0, 60.0]])]
    shapes = [(64, 64)]
    assert torch.equal(rescore(probs, logits, boxes, shapes, 0.0), probs)
    alone = rescore(probs, logits, boxes, shapes, 1.0)
    assert torch.allclose(alone.sum(dim=1), probs.sum(dim=1)) and torch.equal(alone[:, 0], probs[:, 0])
    assert alone[0, 3] > 0.79 and alone[0].argmax() == 3  # the map alone: class 3 takes the first box
    mixed = rescore(probs, logits, boxes, shapes, 0.5)
    assert probs[0, 3] < mixed[0, 3] < alone[0, 3]  # half-way in log space
    by_hand = (probs[0, 1:] / 0.8).sqrt() * (torch.tensor([0.0, 0.0, 1.0, 0.0]) + 1e-6).sqrt()
    assert torch.allclose(mixed[0, 1:] / 0.8, by_hand / by_hand.sum(), atol=1e-2)


def test_a_training_step_trains_the_map_including_an_image_without_cells(shallow: None) -> None:
    torch.manual_seed(0)
    model = build_model(CONFIG).train()
    assert isinstance(model.roi_heads.type_head, TypeMapHead)
    # 65 px: padded to 96, where the unpadded height alone would suggest a stride of 2
    packed, _ = _cells(np.random.default_rng(1), 6, 65, 70)
    with_cells = {"boxes": packed.boxes.float(), "labels": torch.tensor([1, 2, 3, 4, 4, 1]), "masks": packed}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": PackedMasks.from_crops([], np.zeros((0, 4)), (65, 70))}
    losses = model([torch.rand(3, 65, 70), torch.rand(3, 65, 70)], [with_cells, empty])
    assert "loss_types" in losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grad = model.roi_heads.type_head.logits.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_the_map_changes_classes_and_scores_not_boxes(shallow: None) -> None:
    from detector import detect_boxes

    torch.manual_seed(2)
    model = build_model(CONFIG).eval()
    heads = model.roi_heads
    heads.nms_thresh, heads.detections_per_img, heads.detections_per_class = 1.0, 10_000, 0  # every RoI and class
    image = torch.rand(3, 80, 90, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        batch, _ = model.transform([image])
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        found = []
        for weight in (0.0, 1.0):
            heads.type_head.weight = weight
            found.append([t[0] for t in detect_boxes(heads, features, proposals, batch.image_sizes)])
    (boxes0, scores0, labels0), (boxes1, scores1, labels1) = found
    assert len(boxes0) == len(boxes1) == len(proposals[0]) * 4

    def by_box_and_class(boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        keys = np.concatenate([labels[None].numpy(), boxes.numpy().T[::-1]])  # lexsort: last key first
        return torch.from_numpy(np.lexsort(keys))

    order0, order1 = by_box_and_class(boxes0, labels0), by_box_and_class(boxes1, labels1)
    assert torch.equal(boxes0[order0], boxes1[order1]) and torch.equal(labels0[order0], labels1[order1])
    assert not torch.allclose(scores0[order0], scores1[order1])


def test_a_prediction_override_of_the_weight_is_undone(shallow: None) -> None:
    torch.manual_seed(2)
    model = build_model(CONFIG).eval()
    image = torch.rand(3, 80, 90, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain, mapped = (predict_images(model, [image], Settings(type_weight=w))[0] for w in (0.0, 1.0))
    assert model.roi_heads.type_head.weight == 0.5
    assert len(plain["scores"]) > 0 and not torch.equal(plain["scores"], mapped["scores"][:len(plain["scores"])])


def test_a_type_map_checkpoint_predicts_through_inference_without_flags(tmp_path: Path, shallow: None) -> None:
    torch.manual_seed(4)
    checkpoint = assert_cli_predicts_like_the_model(build_model(CONFIG).eval(), CONFIG, tmp_path)
    rebuilt, saved, _ = load_model(checkpoint)
    assert saved["type_map"] == 0.5 and rebuilt.roi_heads.type_head.weight == 0.5


@pytest.mark.parametrize("weight", ["-0.1", "1.5"])
def test_the_flag_refuses_a_weight_outside_0_to_1(weight: str) -> None:
    import argparse

    from model import add_model_args

    parser = argparse.ArgumentParser()
    add_model_args(parser, "resnet101")
    assert parser.parse_args(["--type_map", "0.3"]).type_map == 0.3
    with pytest.raises(SystemExit):
        parser.parse_args(["--type_map", weight])


def test_type_map_weights_into_a_model_without_it_name_the_flag_with_its_weight(tmp_path: Path,
                                                                                shallow: None) -> None:
    from checkpoint import load_weights
    from errors import CheckpointError

    torch.manual_seed(0)
    plain = {**CONFIG, "type_map": 0.0}
    with pytest.raises(CheckpointError, match=r"trained with --type_map 0.5 but the model is built without it; "
                                              r"add --type_map 0.5\."):
        load_weights(build_model(plain), build_model(CONFIG).state_dict(), tmp_path / "t.pth", plain, CONFIG)
    model = build_model(CONFIG)  # fine-tuning into the map: it starts fresh, the rest loads
    load_weights(model, build_model(plain).state_dict(), tmp_path / "t.pth", CONFIG, plain)
    assert model.roi_heads.type_head.logits.weight.abs().sum() > 0
