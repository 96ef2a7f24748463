from __future__ import annotations

import argparse

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from augment import CutOut, add_augment_args, build_train_transforms, erase_instances, mask_boxes
from dataloader import plain_sample


def _target(masks: torch.Tensor) -> tuple[tv_tensors.Image, dict]:
    boxes, _ = mask_boxes(masks)
    size = tuple(masks.shape[-2:])
    image = tv_tensors.Image(torch.rand(3, *size))
    return image, {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=size),
                   "masks": tv_tensors.Mask(masks), "labels": torch.arange(1, len(masks) + 1),
                   "area": masks.flatten(1).sum(1).float(), "iscrowd": torch.zeros(len(masks), dtype=torch.int64),
                   "image_id": 1}


def _masks() -> torch.Tensor:
    masks = torch.zeros(3, 20, 30, dtype=torch.uint8)
    masks[0, 2:6, 3:8] = 1
    masks[1, 10:12, 0:1] = 1   # one pixel wide, at the left edge
    masks[2, 15:20, 20:30] = 1
    return masks


def test_mask_boxes_exclusive_max() -> None:
    boxes, nonempty = mask_boxes(_masks())
    assert boxes.tolist() == [[3, 2, 8, 6], [0, 10, 1, 12], [20, 15, 30, 20]]
    assert nonempty.all()


def test_flips_keep_boxes_on_masks() -> None:
    image, target = _target(_masks())
    for flip in (v2.RandomHorizontalFlip(p=1.0), v2.RandomVerticalFlip(p=1.0)):
        _, out = plain_sample(*flip(image, target))
        expected, _ = mask_boxes(out["masks"])
        assert torch.equal(out["boxes"], expected)


def test_erase_recomputes_boxes_and_drops_empty() -> None:
    image, target = _target(_masks())
    out = erase_instances(target, (0, 0, 6, 12))  # wipes instance 1, cuts instance 0
    assert out["labels"].tolist() == [1, 3]
    assert out["boxes"].tolist() == [[6, 2, 8, 6], [20, 15, 30, 20]]
    assert out["area"].tolist() == [8.0, 50.0]
    assert out["masks"].shape == (2, 20, 30) and out["masks"][:, :12, :6].sum() == 0


def test_cutout_zeroes_image_and_keeps_invariants() -> None:
    torch.manual_seed(0)
    image, target = _target(_masks())
    out_image, out = CutOut(size=8, p=1.0)(image, target)
    assert (out_image == 0).sum() >= 3 * 4 * 4
    boxes, nonempty = mask_boxes(out["masks"])
    assert nonempty.all() and torch.equal(out["boxes"].as_subclass(torch.Tensor), boxes)
    assert torch.equal(out["area"], out["masks"].flatten(1).sum(1).float())


def test_pipeline_from_flags_invariants() -> None:
    parser = argparse.ArgumentParser()
    add_augment_args(parser)
    args = parser.parse_args(["--cutout_p", "1", "--cutout_size", "12"])
    transforms = build_train_transforms(args)
    torch.manual_seed(1)
    for _ in range(20):
        image, target = _target(_masks())
        out_image, out = plain_sample(*transforms(image, target))
        assert out_image.shape == (3, 20, 30)
        boxes, nonempty = mask_boxes(out["masks"])
        assert nonempty.all() and torch.equal(out["boxes"], boxes)
        assert len(out["labels"]) == len(out["masks"]) == len(out["area"])
    assert build_train_transforms(parser.parse_args(["--no_augment"])) is None
