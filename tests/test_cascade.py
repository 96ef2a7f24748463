"""--cascade (cascade.py): per-stage training, relabelling at stricter IoUs, averaged scores at
prediction, checkpoints and host syncs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import host_syncs
from checkpoint import load_model
from conftest import assert_cli_predicts_like_the_model
from model import build_model

CONFIG = {"weights": "none", "input_scale": 0.0, "min_size": 64, "max_size": 96, "detections_per_img": 30,
          "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100,
          "rpn_post_nms_top_n_train": 100, "box_batch_size_per_image": 32, "cascade": True}


def _batch() -> tuple[list[torch.Tensor], list[dict]]:
    """One image with two cells, one without any."""
    images = [torch.rand(3, 64, 72, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    masks = torch.zeros(2, 64, 72, dtype=torch.uint8)
    masks[0, 4:18, 4:20] = masks[1, 30:44, 30:50] = 1
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 18.0], [30.0, 30.0, 50.0, 44.0]]),
                "labels": torch.tensor([1, 3]), "masks": masks},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 64, 72, dtype=torch.uint8)}]
    return images, targets


def test_a_training_step_trains_every_stage_with_and_without_cells(shallow: None) -> None:
    torch.manual_seed(0)
    model = build_model({**CONFIG, "mask_iou": True}).train()
    images, targets = _batch()
    losses = model(images, targets)
    assert "loss_cascade" in losses and "loss_mask_iou" in losses
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    heads = model.roi_heads
    for layer in (heads.box_predictor.cls_score, *(s.cls_score for s in heads.cascade.stages),
                  *(s.bbox_pred for s in heads.cascade.stages)):
        assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0
    model.zero_grad()
    empty = model(images[1:], targets[1:])  # no cell: every RoI of every stage is background
    assert all(torch.isfinite(v) for v in empty.values())
    empty["loss_cascade"].backward()
    assert all(torch.isfinite(p.grad).all() for p in heads.cascade.parameters() if p.grad is not None)
    assert heads.cascade.stages[1].bbox_pred.weight.grad.abs().sum() == 0  # no positive: no box loss


def test_later_stages_label_at_their_stricter_iou(shallow: None) -> None:
    """A box at IoU 0.65 with its cell is a positive of the first two stages, background of the last."""
    heads = build_model(CONFIG).roi_heads
    truth = torch.tensor([[0.0, 0.0, 20.0, 20.0]])
    # IoU 0.65, 1 and 0 with the cell
    proposals = [torch.tensor([[0.0, 0.0, 20.0, 13.0], [0.0, 0.0, 20.0, 20.0], [40.0, 40.0, 50.0, 50.0]])]
    labels = [heads.assign_targets_to_proposals(proposals, [truth], [torch.tensor([2])], matcher)[1][0].tolist()
              for matcher in (heads.proposal_matcher, *(s.matcher for s in heads.cascade.stages))]
    assert labels == [[2, 2, 0], [2, 2, 0], [0, 2, 0]]


def test_scores_are_the_stages_mean_and_boxes_the_last_stage(shallow: None) -> None:
    """Stages that keep every box and know nothing (uniform probabilities) leave the detections
    of the first stage, each score the mean of its probability and the later stages' 1/classes;
    a last stage that moves every box moves the detections with it."""
    torch.manual_seed(1)
    model = build_model(CONFIG).eval()
    regression = model.roi_heads.box_predictor.bbox_pred  # one box per RoI, whichever class: as the cascade's
    regression.weight.data[:] = regression.weight.data[4:8].repeat(5, 1)
    regression.bias.data[:] = regression.bias.data[4:8].repeat(5)
    for stage in model.roi_heads.cascade.stages:
        for layer in (stage.cls_score, stage.bbox_pred):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
    image = torch.rand(3, 80, 90, generator=torch.Generator().manual_seed(2))
    cascade = model.roi_heads.cascade
    with torch.no_grad():
        staged = model([image])[0]
        del model.roi_heads.cascade
        plain = model([image])[0]
        model.roi_heads.cascade = cascade
    assert len(plain["scores"]) > 5 and torch.equal(staged["labels"], plain["labels"])
    torch.testing.assert_close(staged["boxes"], plain["boxes"], atol=1e-3, rtol=0)
    torch.testing.assert_close(staged["scores"], (plain["scores"] + 2 / 5) / 3)
    # The second stage moves every box (dx 0.15 width, dy 0.075 height at weights 20, 20) and
    # knows nothing; the last reads the features inside the boxes it is given and moves none.
    middle, last = cascade.stages
    middle.bbox_pred.bias.data[:2] = torch.tensor([3.0, 1.5])
    torch.nn.init.normal_(last.cls_score.weight, std=1.0)
    heads = model.roi_heads
    with torch.no_grad():
        batch, _ = model.transform([image])
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        logits, deltas = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes)))
        probs, boxes = cascade.refine(heads, features, proposals, batch.image_sizes, logits, deltas)
        first = torch.softmax(logits, -1)
        classes = first[:, 1:].argmax(dim=1) + 1
        height, width = batch.image_sizes[0]  # the network's input, where boxes are clipped
        bound = torch.tensor([width, height, width, height], dtype=torch.float32)
        start = torch.minimum(heads.box_coder.decode(deltas, proposals)[torch.arange(len(classes)), classes].clamp(min=0),
                              bound)
        sides = start[:, 2:] - start[:, :2]
        moved = torch.minimum(start + torch.cat([sides * torch.tensor([0.15, 0.075])] * 2, dim=1), bound)
        last_probs = torch.softmax(last(heads.box_roi_pool(features, [moved], batch.image_sizes))[0], -1)
    torch.testing.assert_close(boxes, moved, atol=1e-3, rtol=0)
    assert not torch.allclose(last_probs, torch.full_like(last_probs, 0.2), atol=1e-3)
    torch.testing.assert_close(probs, (first + 0.2 + last_probs) / 3, atol=1e-4, rtol=0)


def test_boxes_refined_out_of_the_image_train_to_finite_gradients(shallow: None) -> None:
    """A first stage that sends every box past the image's right edge: the later stages get
    boxes of no width, which must neither count nor turn a gradient into NaN."""
    torch.manual_seed(5)
    model = build_model(CONFIG).train()
    model.roi_heads.box_predictor.bbox_pred.bias.data[0::4] = 1000.0  # dx: 100 widths to the right
    images, targets = _batch()
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_scale_gradient_is_exact_forward_and_scales_backward() -> None:
    from detector import scale_gradient

    x = torch.randn(50, dtype=torch.float16, requires_grad=True)
    y = scale_gradient(x, 1 / 3)
    assert torch.equal(y, x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1 / 3))


def test_a_run_without_the_heads_resumes_only_without_their_flags() -> None:
    import training
    from errors import CheckpointError
    from model import config_from_args

    parser = training.build_parser("resnet101", "")
    args = parser.parse_args(["--train_dir", "x", "--cascade", "--resume", "old/last.pth"])
    old = {k: v for k, v in config_from_args(parser.parse_args(["--train_dir", "x"]), "resnet101").items()
           if k not in ("mask_iou", "cascade")}  # a run from before the heads existed
    with pytest.raises(CheckpointError, match="trained with no --cascade, now --cascade"):
        training._run_config(args, "resnet101", {"config": old})
    plain = training._run_config(parser.parse_args(["--train_dir", "x", "--resume", "old/last.pth"]), "resnet101",
                                 {"config": old})
    assert plain["cascade"] is False and plain["mask_iou"] is False


def test_a_cascade_checkpoint_predicts_through_inference_without_flags(tmp_path: Path, shallow: None) -> None:
    torch.manual_seed(4)
    config = {**CONFIG, "mask_iou": True}
    model = build_model(config).eval()
    rebuilt, saved, _ = load_model(assert_cli_predicts_like_the_model(model, config, tmp_path))
    assert saved["cascade"] and len(rebuilt.roi_heads.cascade.stages) == 2
    assert torch.equal(rebuilt.roi_heads.cascade.stages[1].cls_score.weight,
                       model.roi_heads.cascade.stages[1].cls_score.weight)


def test_a_model_without_the_cascade_fine_tunes_into_one(tmp_path: Path, shallow: None) -> None:
    from checkpoint import load_weights

    plain = build_model({**CONFIG, "cascade": False})
    staged = build_model(CONFIG)
    fresh = staged.roi_heads.cascade.stages[0].cls_score.weight.clone()
    load_weights(staged, plain.state_dict(), tmp_path / "plain.pth", CONFIG)
    assert torch.equal(staged.roi_heads.box_predictor.cls_score.weight, plain.roi_heads.box_predictor.cls_score.weight)
    assert torch.equal(staged.roi_heads.cascade.stages[0].cls_score.weight, fresh)


def test_cascade_weights_into_a_model_without_it_name_the_flag(tmp_path: Path, shallow: None) -> None:
    from checkpoint import load_weights
    from errors import CheckpointError

    staged = build_model(CONFIG)
    plain = build_model({**CONFIG, "cascade": False})
    with pytest.raises(CheckpointError, match="add --cascade"):
        load_weights(plain, staged.state_dict(), tmp_path / "staged.pth", CONFIG)


def test_training_syncs_stay_flat_in_cells_with_both_heads(tmp_path: Path, shallow: None) -> None:
    out = tmp_path / "syncs.json"
    host_syncs.main(["--counts", "4", "12", "--size", "48", "56", "--steps", "0", "--part_reps", "1",
                     "--variants", "ours",
                     "--rpn_post_nms_top_n_train", "100", "--box_batch_size_per_image", "32", "--predict_size", "96",
                     "--rpn_post_nms_top_n_test", "100", "--detections_per_img", "20", "--mask_iou", "--cascade",
                     "--json", str(out)])
    payload = json.loads(out.read_text())
    few, many = sorted(payload["rows"], key=lambda r: r["instances"])
    assert few["syncs_per_step"] == many["syncs_per_step"] <= 10 and many["copies_per_step"] == 0
    assert payload["targets_met"]["ours_syncs_same_at_every_count"]
    stock, ours = payload["prediction"]
    assert ours["syncs_per_image"] < stock["syncs_per_image"] and ours["copies_per_image"] == 0


def test_cal_param_counts_the_stages(shallow: None) -> None:
    import cal_param

    model = build_model(CONFIG)
    counts = cal_param.count_parts(model, use_attn=False)
    stages = sum(p.numel() for p in model.roi_heads.cascade.parameters())
    assert counts["parts"]["cascade stages"]["total"] == stages > 0
    assert "other" not in counts["parts"] and counts["total"]["total"] == sum(p.numel() for p in model.parameters())
