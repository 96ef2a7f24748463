"""``--context_roi``: the box heads see each RoI's features and its surroundings'."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from checkpoint import load_model
from conftest import assert_cli_predicts_like_the_model
from detector import ContextRoIAlign
from model import build_model

CONFIG = {"weights": "none", "input_scale": 0.0, "min_size": 64, "max_size": 96, "detections_per_img": 30,
          "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100,
          "rpn_post_nms_top_n_train": 100, "box_batch_size_per_image": 32, "context_roi": 2.0}


def test_context_pooling_is_the_roi_and_its_enlarged_box_clipped_to_the_image(shallow: None) -> None:
    torch.manual_seed(0)
    model = build_model(CONFIG).eval()
    pool = model.roi_heads.box_roi_pool
    assert isinstance(pool, ContextRoIAlign) and pool.output_size == (7, 7)
    features = {name: torch.rand(1, 256, 64 // 2 ** (k + 2), 72 // 2 ** (k + 2)) for k, name in enumerate("0123")}
    boxes = [torch.tensor([[10.0, 20.0, 30.0, 30.0], [0.0, 0.0, 8.0, 6.0]])]
    # by hand: twice the size about the centre (20, 25) and (4, 3), then clipped to the 64 x 72 image
    wide = [torch.tensor([[0.0, 15.0, 40.0, 35.0], [0.0, 0.0, 12.0, 9.0]])]
    pooled = pool(features, boxes, [(64, 72)])
    assert pooled.shape == (2, 512, 7, 7)
    assert torch.equal(pooled[:, :256], pool.pool(features, boxes, [(64, 72)]))
    assert torch.equal(pooled[:, 256:], pool.pool(features, wide, [(64, 72)]))
    assert model.roi_heads.box_head.fc6.in_features == 512 * 7 * 7
    two = {name: torch.rand(2, *f.shape[1:]) for name, f in features.items()}  # two images: rows stay per image
    boxes2 = [boxes[0], torch.tensor([[5.0, 5.0, 25.0, 15.0]])]
    wide2 = [wide[0], torch.tensor([[0.0, 0.0, 35.0, 20.0]])]
    expected = torch.cat([pool.pool(two, boxes2, [(64, 72)] * 2), pool.pool(two, wide2, [(64, 72)] * 2)], dim=1)
    assert torch.equal(pool(two, boxes2, [(64, 72)] * 2), expected)


def test_a_training_step_trains_the_wider_box_head_with_the_cascade(shallow: None) -> None:
    torch.manual_seed(0)
    model = build_model({**CONFIG, "cascade": True}).train()
    masks = torch.zeros(1, 64, 72, dtype=torch.uint8)
    masks[0, 4:18, 4:20] = 1
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 18.0]]), "labels": torch.tensor([4]), "masks": masks}]
    losses = model([torch.rand(3, 64, 72)], targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for layer in (model.roi_heads.box_head.fc6, model.roi_heads.cascade.stages[1].box_head.fc6):
        assert layer.in_features == 512 * 7 * 7
        assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0


def test_a_context_checkpoint_predicts_through_inference_without_flags(tmp_path: Path, shallow: None) -> None:
    torch.manual_seed(4)
    checkpoint = assert_cli_predicts_like_the_model(build_model(CONFIG).eval(), CONFIG, tmp_path)
    rebuilt, saved, _ = load_model(checkpoint)
    assert saved["context_roi"] == 2.0 and isinstance(rebuilt.roi_heads.box_roi_pool, ContextRoIAlign)


def test_context_weights_into_a_model_without_it_name_the_flag(tmp_path: Path, shallow: None) -> None:
    from checkpoint import load_weights
    from errors import CheckpointError

    torch.manual_seed(0)
    weights = build_model(CONFIG).state_dict()
    plain = {**CONFIG, "context_roi": 0.0}
    with pytest.raises(CheckpointError, match=r"trained with --context_roi 2.0, model built with --context_roi 0.0;"):
        load_weights(build_model(plain), weights, tmp_path / "c.pth", plain, CONFIG)
    anchors = {"anchor_sizes": [8, 16, 32, 64, 128]}  # differs too, but changes no shape: not blamed
    with pytest.raises(CheckpointError, match=r"trained with --context_roi 0.0, model built with --context_roi 2.0;") \
            as refused:
        load_weights(build_model(CONFIG), build_model(plain).state_dict(), tmp_path / "c.pth",
                     {**CONFIG, "anchor_sizes": [16, 32, 64, 128, 256]}, {**plain, **anchors})
    assert "anchor" not in str(refused.value)
    from model import shape_differences
    assert shape_differences({"context_roi": 2.0}, {"context_roi": 3.0}) == []  # the factor changes no shape
    old_taps = {"backbone": "effnet_v2_m", "effnet_taps": [2, 3, 5, 7], "use_attn": False}
    assert shape_differences(old_taps, {**old_taps, "effnet_taps": [2, 3, 4, 6], "use_attn": True}) == ["use_attn",
                                                                                                      "effnet_taps"]


def test_cal_param_counts_the_wider_first_layer(shallow: None) -> None:
    import cal_param

    plain, context = (cal_param.count_config("resnet101", False, 5, "none", context_roi=f)["parts"]["box head"]
                      for f in (0.0, 2.0))
    assert context["total"] - plain["total"] == 256 * 7 * 7 * 1024  # fc6's added inputs
