from __future__ import annotations

import argparse
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import resnet101
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.models.detection._utils import Matcher
from torchvision.ops import FrozenBatchNorm2d, box_iou

from detector import CellTransform, PairwiseIoU, SlicedMatcher
from errors import WeightsError
from model import add_model_args, build_model, config_from_args

ROOT = Path(__file__).resolve().parents[1]

TINY = {"weights": "none", "min_size": 64, "max_size": 64, "input_scale": 0.0, "detections_per_img": 10}


def _trainable(model: torch.nn.Module, prefix: str) -> bool:
    return any(p.requires_grad for n, p in model.named_parameters() if n.startswith(prefix))


def test_resnet_pretrained_layout_freezes_stem_and_layer1(tmp_path: Path) -> None:
    path = tmp_path / "r101.pth"
    torch.save(resnet101().state_dict(), path)
    model = build_model({"backbone": "resnet101", "weights": str(path)})
    body = model.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert not _trainable(body, "conv1") and not _trainable(body, "layer1")
    assert _trainable(body, "layer2") and _trainable(body, "layer4")
    assert torch.equal(body.layer3[0].conv1.weight, torch.load(path)["layer3.0.conv1.weight"])


def test_from_scratch_backbones_learn_their_normalisation() -> None:
    for backbone in ("resnet101", "effnet_v2_m"):
        model = build_model({**TINY, "backbone": backbone})
        norms = [m for m in model.backbone.body.modules() if isinstance(m, torch.nn.GroupNorm)]
        assert norms and all(m.weight.requires_grad for m in norms)
        assert not any(isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)) for m in model.backbone.body.modules())
        assert all(p.requires_grad for p in model.parameters())


def test_effnet_levels_at_strides_4_to_64() -> None:
    model = build_model({**TINY, "backbone": "effnet_v2_m"}).eval()
    features = model.backbone(torch.zeros(1, 3, 128, 128))
    assert {k: tuple(v.shape[-2:]) for k, v in features.items()} == {
        "0": (32, 32), "1": (16, 16), "2": (8, 8), "3": (4, 4), "pool": (2, 2)}
    assert all(v.shape[1] == 256 for v in features.values())


def test_pretrained_effnet_freezes_early_stages_and_their_statistics(tmp_path: Path) -> None:
    from torchvision.models import efficientnet_v2_m

    path = tmp_path / "eff.pth"
    torch.save(efficientnet_v2_m().state_dict(), path)
    body = build_model({"backbone": "effnet_v2_m", "weights": str(path)}).backbone.body
    assert not any(p.requires_grad for p in body["0"].parameters())
    assert not any(p.requires_grad for p in body["1"].parameters())  # the paper's layout: stem and stage 1
    assert any(p.requires_grad for p in body["2"].parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())


def test_effnet_taps_the_papers_blocks_and_old_checkpoints_keep_theirs(tmp_path: Path) -> None:
    from checkpoint import load_model, save_checkpoint

    model = build_model({**TINY, "backbone": "effnet_v2_m"})
    assert list(model.backbone.body) == ["0", "1", "2", "3", "4", "5", "6"]  # blocks 7 and 8 never run
    assert [b[0].in_channels for b in model.backbone.fpn.inner_blocks] == [48, 80, 160, 304]
    old_config = {**TINY, "backbone": "effnet_v2_m"}  # written before effnet_taps existed
    old = build_model({**old_config, "effnet_taps": [2, 3, 5, 7], "effnet_frozen": 3})
    save_checkpoint(tmp_path / "old.pth", {"model": old.state_dict(), "config": old_config})
    loaded, config, _ = load_model(tmp_path / "old.pth")
    assert config["effnet_taps"] == [2, 3, 5, 7]
    assert [b[0].in_channels for b in loaded.backbone.fpn.inner_blocks] == [48, 80, 176, 512]
    image = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        assert torch.equal(old.eval()(image)[0]["scores"], loaded.eval()(image)[0]["scores"])


def test_bad_weights_file_is_explained(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no such weights file"):
        build_model({"backbone": "resnet101", "weights": str(tmp_path / "missing.pth")})
    run_file = tmp_path / "best.pth"  # a checkpoint of this project: numpy RNG state, refused as weights only
    torch.save({"model": {}, "rng": {"numpy": np.random.get_state()}}, run_file)
    with pytest.raises(WeightsError, match="best.pth: not a readable state dict.*as --checkpoint"):
        build_model({"backbone": "resnet101", "weights": str(run_file)})
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(WeightsError, match="cut.pth: not a readable state dict"):
        build_model({"backbone": "resnet101", "init_detector": str(tmp_path / "cut.pth"), "weights": "none"})
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(RuntimeError, match="missing keys"):
        build_model({"backbone": "resnet101", "weights": str(wrong)})


def test_small_images_are_not_upscaled_and_large_ones_shrink() -> None:
    transform = CellTransform(min_size=1024, max_size=2048, max_upscale=1.0).eval()
    small = torch.rand(3, 93, 120)
    batch, _ = transform([small])
    assert tuple(batch.image_sizes[0]) == (93, 120)
    big, _ = transform([torch.rand(3, 1100, 2400)])
    assert max(big.image_sizes[0]) == 2048


def test_input_scale_resizes_crops_and_whole_images_by_one_factor() -> None:
    transform = CellTransform(min_size=1024, max_size=2048, max_upscale=1.0, input_scale=2.5).eval()
    for height, width in ((64, 64), (93, 120), (400, 600)):
        batch, _ = transform([torch.rand(3, height, width)])
        assert tuple(batch.image_sizes[0]) == (round(height * 2.5), round(width * 2.5))
    transform.train()
    masks = torch.zeros(1, 40, 40, dtype=torch.uint8)
    masks[0, 10:20, 10:30] = 1
    target = {"boxes": torch.tensor([[10.0, 10.0, 30.0, 20.0]]), "labels": torch.tensor([1]), "masks": masks}
    _, (scaled,) = transform([torch.rand(3, 40, 40)], [target])
    assert scaled["masks"].shape[-2:] == (100, 100)
    assert torch.allclose(scaled["boxes"], target["boxes"] * 2.5)
    assert scaled["resize"] == (2.5, 2.5)  # what --mask_iou's targets find the paste frames with
    assert float(scaled["masks"].sum()) == pytest.approx(float(masks.sum()) * 2.5 ** 2, rel=0.1)


def test_input_scale_warns_when_max_size_caps_it() -> None:
    transform = CellTransform(min_size=1024, max_size=1000, max_upscale=1.0, input_scale=2.0).eval()
    with pytest.warns(UserWarning, match="--input_scale 2.0"):
        batch, _ = transform([torch.rand(3, 300, 800)])
    assert max(batch.image_sizes[0]) == 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per model, not once per image
        transform([torch.rand(3, 300, 900)])


def test_input_scale_flag_reaches_the_model_and_zero_switches_it_off() -> None:
    parser = argparse.ArgumentParser()
    add_model_args(parser, backbone="resnet101")
    args = parser.parse_args(["--input_scale", "2", "--weights", "none"])
    model = build_model({**config_from_args(args, "resnet101"), "min_size": 64, "max_size": 512})
    assert model.transform.scale_for(100, 200) == 2.0
    off = build_model({**config_from_args(parser.parse_args(["--input_scale", "0", "--weights", "none"]), "resnet101"),
                       "min_size": 1024, "max_size": 2048, "max_upscale": 1.0})
    assert off.transform.scale_for(100, 200) == 1.0  # 0: --min_size and --max_upscale decide
    with pytest.raises(SystemExit):
        parser.parse_args(["--input_scale", "-1"])


def test_init_detector_from_a_local_coco_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    coco = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    path = tmp_path / "coco.pth"
    torch.save(coco.state_dict(), path)
    ref = coco.state_dict()
    model = build_model({**TINY, "backbone": "resnet101", "init_detector": str(path)})
    own = model.state_dict()
    for key in ("backbone.fpn.layer_blocks.0.0.weight", "rpn.head.conv.0.0.weight", "roi_heads.box_head.fc6.weight",
                "roi_heads.mask_head.0.0.weight", "roi_heads.mask_predictor.conv5_mask.weight"):
        assert torch.equal(own[key], ref[key]), key
    assert own["roi_heads.box_predictor.cls_score.weight"].shape[0] == 5  # class-specific: fresh
    assert not torch.equal(own["backbone.body.conv1.weight"], ref["backbone.body.conv1.weight"])
    effnet = build_model({**TINY, "backbone": "effnet_v2_m", "init_detector": str(path)}).state_dict()
    assert torch.equal(effnet["backbone.fpn.layer_blocks.1.0.weight"], ref["backbone.fpn.layer_blocks.1.0.weight"])
    assert effnet["backbone.fpn.inner_blocks.0.0.weight"].shape[1] == 48  # shape differs: kept fresh


def _boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    corner = torch.rand(n, 2, generator=generator) * 100
    return torch.cat([corner, corner + 1 + torch.rand(n, 2, generator=generator) * 30], dim=1)


@pytest.mark.parametrize("low_quality", [True, False])
@pytest.mark.parametrize("n_gt", [1, 37])
def test_sliced_matcher_equals_torchvision_matcher(n_gt: int, low_quality: bool) -> None:
    generator = torch.Generator().manual_seed(n_gt)
    gt, anchors = _boxes(n_gt, generator), _boxes(1001, generator)
    gt = torch.cat([gt, gt[:1]])  # a duplicate box: ties between boxes and anchors
    anchors[::7] = gt[torch.arange(len(anchors[::7])) % len(gt)]  # anchors that equal a box exactly
    stock = Matcher(0.7, 0.3, allow_low_quality_matches=low_quality)
    sliced = SlicedMatcher(stock, pairs=50)  # many slices, the last one short
    expected = stock(box_iou(gt, anchors))
    assert torch.equal(sliced(PairwiseIoU(gt, anchors)), expected)
    assert torch.equal(sliced(box_iou(gt, anchors)), expected)  # a plain matrix is matched as before
    assert (expected >= 0).any() and (expected == Matcher.BELOW_LOW_THRESHOLD).any()


def test_rpn_targets_equal_the_stock_matching() -> None:
    model = build_model(TINY)
    assert isinstance(model.rpn.proposal_matcher, SlicedMatcher)
    generator = torch.Generator().manual_seed(0)
    anchors = [_boxes(3000, generator), _boxes(500, generator)]
    targets = [{"boxes": _boxes(40, generator)}, {"boxes": torch.zeros(0, 4)}]
    ours = model.rpn.assign_targets_to_anchors(anchors, targets)
    model.rpn.box_similarity, model.rpn.proposal_matcher = box_iou, Matcher(0.7, 0.3, True)
    stock = model.rpn.assign_targets_to_anchors(anchors, targets)
    for mine, theirs in zip(ours, stock):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))


def test_importing_project_modules_changes_nothing_in_torchvision() -> None:
    """Every public attribute of torchvision's detection and ops modules is the same object
    after importing every project module: the detector is installed by build_model only."""
    modules = sorted(p.stem for p in ROOT.glob("*.py"))
    code = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import torch.nn.init
import torchvision.ops, torchvision.models.detection as det
from torchvision.models.detection import roi_heads, rpn, transform, _utils, anchor_utils, mask_rcnn
parts = (torch.nn.init, torchvision.ops, det, roi_heads, rpn, transform, _utils, anchor_utils, mask_rcnn)
def snapshot():
    return {{(m.__name__, k): id(v) for m in parts for k, v in vars(m).items() if not k.startswith('__')}}
before = snapshot()
for name in {modules!r}:
    __import__(name)
after = snapshot()
changed = sorted(k for k in before if after.get(k) != before[k])
print(changed)
assert not changed, changed
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(modules) > 20  # every script and library module was imported


def test_detections_per_img_0_means_no_image_cap(shallow: None) -> None:
    from model import UNLIMITED

    model = build_model({**TINY, "detections_per_img": 0}, load_weights=False)
    assert model.roi_heads.detections_per_img == UNLIMITED
    assert build_model(TINY, load_weights=False).roi_heads.detections_per_img == TINY["detections_per_img"]
