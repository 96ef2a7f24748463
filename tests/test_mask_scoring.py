"""--mask_iou (mask_scoring.py): IoU targets, the loss on a training step, rescoring at prediction."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint import load_model, save_checkpoint
from conftest import predicted_through_cli
from detector import project_masks_on_boxes
from mask_scoring import MaskIoUHead, mask_iou_targets
from coco import paste_masks
from masks import PackedMasks, mask_areas, paste_frames
from model import build_model
from predictor import Settings, predict_images

CONFIG = {"weights": "none", "input_scale": 0.0, "min_size": 64, "max_size": 96, "detections_per_img": 30,
          "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100,
          "rpn_post_nms_top_n_train": 100, "box_batch_size_per_image": 32, "mask_iou": True}


def test_mask_iou_targets_equal_a_direct_iou() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 28, 28, generator=generator)
    targets = (torch.rand(6, 28, 28, generator=generator) > 0.6).float()
    targets[5] = 0.0
    logits[5] = -1.0  # both empty: IoU 0
    got = mask_iou_targets(logits, targets)
    for i in range(6):
        pred, truth = logits[i].numpy() > 0, targets[i].numpy() > 0.5
        union = np.logical_or(pred, truth).sum()
        expected = np.logical_and(pred, truth).sum() / union if union else 0.0
        assert got[i].item() == pytest.approx(expected)


@pytest.mark.parametrize("packed", [True, False])
def test_mask_iou_targets_are_the_iou_of_the_pasted_mask_with_its_whole_cell(packed: bool) -> None:
    # One 30 x 20 px cell (600 px), RoIs around all of it, half of it, twice it, and half of it
    # with as much empty: each mask (filling its frame, or an ellipse) pasted on the image as
    # prediction pastes it (coco.paste_masks), then its IoU with the whole cell.
    cell = np.zeros((64, 64), dtype=bool)
    cell[10:30, 10:40] = True
    masks = PackedMasks.from_crops([cell[10:30, 10:40]], np.array([[10, 10, 40, 30]]), (64, 64))
    gt = masks if packed else masks.full()
    boxes = torch.tensor([[10.0, 10, 40, 30], [10, 10, 25, 30], [0, 0, 40, 30], [25, 10, 55, 30], [12, 8, 37, 33]])
    matched = torch.zeros(len(boxes), dtype=torch.int64)
    v, u = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    logits = torch.full((len(boxes), 28, 28), 5.0)
    logits[4] = torch.where(u ** 2 + v ** 2 < 0.8, 5.0, -5.0)  # an ellipse inside its box
    pasted = paste_masks(logits.sigmoid(), boxes, (64, 64)).full().bool().numpy()
    truth = [(np.logical_and(p, cell).sum() / np.logical_or(p, cell).sum()).item() for p in pasted]
    frames = paste_frames(boxes, 28)
    got = mask_iou_targets(logits, project_masks_on_boxes(gt, frames, matched, 28, aligned=True), frames,
                           mask_areas(gt)[matched])
    # the target counts binarised bins, pasting thresholds after a bilinear resize: a curved edge differs by a few px
    assert got.tolist() == pytest.approx(truth, abs=0.03)
    assert truth[1] < 0.55 and truth[3] < 0.4  # where the frame alone would see a whole cell in its box
    in_frame = mask_iou_targets(logits, project_masks_on_boxes(gt, boxes, matched, 28))  # the old target
    assert in_frame[1].item() > 0.9 and in_frame[0].item() > truth[0] + 0.02
    # at --input_scale 2 the model sees the image twice as large, but prediction pastes at its own size
    assert torch.allclose(paste_frames(boxes * 2, 28, (2.0, 2.0)), frames * 2)


def test_the_head_reads_each_roi_class() -> None:
    head = MaskIoUHead(8, num_classes=3, width=8, hidden=16)
    features, logits = torch.randn(4, 8, 14, 14), torch.randn(4, 28, 28)
    every = head.iou(head.fc(head.convs(torch.cat([features, torch.nn.functional.max_pool2d(
        logits.sigmoid()[:, None], 2)], dim=1))))
    labels = torch.tensor([0, 2, 1, 2])
    assert torch.allclose(head(features, logits, labels), every[torch.arange(4), labels])


@pytest.mark.parametrize("input_scale", [0.0, 2.0])  # 2: packed masks, resized, paste frames at the image's size
def test_a_training_step_has_a_finite_mask_iou_loss_with_and_without_cells(input_scale: float, shallow: None) -> None:
    torch.manual_seed(0)
    model = build_model({**CONFIG, "input_scale": input_scale, "max_size": 192}).train()
    images = [torch.rand(3, 64, 72), torch.rand(3, 64, 72)]
    boxes = torch.tensor([[4.0, 4.0, 20.0, 18.0], [30.0, 30.0, 50.0, 44.0]])
    masks = torch.zeros(2, 64, 72, dtype=torch.uint8)
    masks[0, 4:18, 4:20] = masks[1, 30:44, 30:50] = 1
    no_masks = torch.zeros(0, 64, 72, dtype=torch.uint8)
    if input_scale:
        masks = PackedMasks.from_crops([masks[0, 4:18, 4:20].numpy(), masks[1, 30:44, 30:50].numpy()],
                                       boxes.numpy().astype(np.int64), (64, 72))
        no_masks = PackedMasks.from_crops([], np.zeros((0, 4), dtype=np.int64), (64, 72))
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 3]), "masks": masks},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": no_masks}]
    losses = model(images, targets)
    assert "loss_mask_iou" in losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.roi_heads.mask_iou_head.iou.weight.grad.abs().sum() > 0
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad is not None
    empty = model(images[1:], targets[1:])  # an image without cells: no positive RoI
    assert empty["loss_mask_iou"].item() == 0.0


def test_rescoring_changes_the_order_and_nothing_else(tmp_path: Path, shallow: None) -> None:
    """The same detections and masks with and without the head's rescoring; scores become
    class probability x predicted IoU, and the order follows them. A checkpoint with the head
    round-trips through inference.py without flags."""
    torch.manual_seed(1)
    model = build_model(CONFIG).eval()
    head = model.roi_heads.mask_iou_head
    torch.nn.init.normal_(head.iou.weight, std=0.5)  # an untrained head would predict one IoU for all
    image = torch.rand(3, 80, 90, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        scored = predict_images(model, [image], Settings())[0]
        del model.roi_heads.mask_iou_head
        plain = predict_images(model, [image], Settings())[0]
        model.roi_heads.mask_iou_head = head
    assert len(plain["scores"]) == len(scored["scores"]) > 5
    key = lambda out: [tuple(b) + (int(lab),) for b, lab in zip(out["boxes"].tolist(), out["labels"])]  # noqa: E731
    assert sorted(key(plain)) == sorted(key(scored))
    assert torch.equal(scored["scores"], scored["scores"].sort(descending=True).values)
    assert not torch.equal(scored["scores"], plain["scores"]) and (scored["scores"] <= 1.0).all()
    order_plain = {k: i for i, k in enumerate(key(plain))}
    ratio = [s / plain["scores"][order_plain[k]] for k, s in zip(key(scored), scored["scores"])]
    assert all(0.0 <= r <= 1.0 + 1e-6 for r in ratio)  # each score times an IoU in [0, 1]
    save_checkpoint(tmp_path / "best.pth", {"model": model.state_dict(), "config": CONFIG, "args": {}})
    rebuilt, _, _ = load_model(tmp_path / "best.pth")
    assert getattr(rebuilt.roi_heads, "mask_iou_head", None) is not None
    assert torch.equal(rebuilt.roi_heads.mask_iou_head.iou.weight, head.iou.weight)
    results = predicted_through_cli(tmp_path / "best.pth", image, tmp_path)
    assert len(results) == len(scored["scores"])
    assert max(r["score"] for r in results) == pytest.approx(scored["scores"][0].item(), abs=1e-2)


def test_a_model_without_the_head_fine_tunes_into_one(tmp_path: Path, shallow: None) -> None:
    from checkpoint import load_weights

    plain = build_model({**CONFIG, "mask_iou": False})
    scored = build_model(CONFIG)
    fresh = scored.roi_heads.mask_iou_head.iou.weight.clone()
    load_weights(scored, plain.state_dict(), tmp_path / "plain.pth", CONFIG)
    assert torch.equal(scored.roi_heads.box_predictor.cls_score.weight, plain.roi_heads.box_predictor.cls_score.weight)
    assert torch.equal(scored.roi_heads.mask_iou_head.iou.weight, fresh)  # the new head keeps its init


def test_the_mask_iou_loss_is_logged_beside_the_others() -> None:
    from engine import EpochMeter
    from history import LOSS_KEYS

    meter = EpochMeter()
    losses = {k: torch.tensor(0.5) for k in LOSS_KEYS}
    meter.add({**losses, "loss_mask_iou": torch.tensor(0.25)}, torch.tensor(2.75), [1])
    meter.add(losses, torch.tensor(2.5), [2])  # a model without the head logs 0
    meter.read(1)
    assert meter.sums["loss_mask_iou"] == pytest.approx(0.25) and meter.sums["loss"] == pytest.approx(5.25)
    assert meter.sums["loss_mask"] == pytest.approx(1.0) and meter.steps == 2
