"""Paired image + target augmentation for training, on torchvision.transforms.v2.

v2 moves boxes and masks with the image for the geometric ops. CutOut is the one op that
erases pixels, so it recomputes the boxes of the instances it touches and drops those left
with no pixels: a box must never outlive its mask.
"""
from __future__ import annotations

import argparse

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2


def add_augment_args(parser: argparse.ArgumentParser) -> None:
    """The augmentation flags, shared by both train scripts."""
    group = parser.add_argument_group("augmentation")
    group.add_argument("--hflip_p", type=float, default=0.5, help="probability of a horizontal flip")
    group.add_argument("--vflip_p", type=float, default=0.5, help="probability of a vertical flip")
    group.add_argument("--jitter_p", type=float, default=0.8, help="probability of colour jitter")
    group.add_argument("--brightness", type=float, default=0.2, help="colour jitter brightness")
    group.add_argument("--contrast", type=float, default=0.2, help="colour jitter contrast")
    group.add_argument("--saturation", type=float, default=0.2, help="colour jitter saturation")
    group.add_argument("--cutout_p", type=float, default=0.5, help="probability of one CutOut square")
    group.add_argument("--cutout_size", type=int, default=50, help="CutOut square side in pixels")
    group.add_argument("--crop", type=int, default=0,
                       help="train on random SIZE x SIZE windows at native resolution (0: whole images)")
    group.add_argument("--no_augment", action="store_true", help="train without any augmentation")


def build_train_transforms(args: argparse.Namespace) -> v2.Compose | None:
    """The training pipeline from the flags of ``add_augment_args``."""
    if args.no_augment:
        return None
    jitter = v2.ColorJitter(brightness=args.brightness, contrast=args.contrast, saturation=args.saturation)
    return v2.Compose(
        [
            v2.RandomApply([jitter], p=args.jitter_p),
            v2.RandomHorizontalFlip(p=args.hflip_p),
            v2.RandomVerticalFlip(p=args.vflip_p),
            CutOut(size=args.cutout_size, p=args.cutout_p),
        ]
    )


def build_crop_window(args: argparse.Namespace) -> "RandomWindow | None":
    """The random training window of ``--crop``, or None for whole images."""
    return RandomWindow(args.crop) if args.crop > 0 else None


class RandomWindow:
    """A uniformly placed ``size`` x ``size`` window (the whole side when the image is smaller);
    the dataset renders only the instances inside it."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, height: int, width: int) -> tuple[int, int, int, int]:
        y0 = int(torch.randint(0, max(height - self.size, 0) + 1, ()))
        x0 = int(torch.randint(0, max(width - self.size, 0) + 1, ()))
        return y0, x0, min(y0 + self.size, height), min(x0 + self.size, width)


class CutOut:
    """Zero one ``size`` x ``size`` square in the image and in every mask.

    Works on the target dict produced by ``dataloader.HW3TrainDataset.load``; only the
    instances whose box meets the square are re-measured, so dense images stay cheap.
    """

    def __init__(self, size: int = 50, p: float = 0.5) -> None:
        self.size = size
        self.p = p

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        if self.size <= 0 or torch.rand(()) >= self.p:
            return image, target
        height, width = image.shape[-2:]
        cy = int(torch.randint(0, height, ()))
        cx = int(torch.randint(0, width, ()))
        y1, y2 = max(cy - self.size // 2, 0), min(cy + (self.size + 1) // 2, height)
        x1, x2 = max(cx - self.size // 2, 0), min(cx + (self.size + 1) // 2, width)
        image = image.clone()
        image[..., y1:y2, x1:x2] = 0
        return image, erase_instances(target, (x1, y1, x2, y2))


def erase_instances(target: dict, region: tuple[int, int, int, int]) -> dict:
    """Zero ``region`` (x1, y1, x2, y2) in the masks, re-box touched instances, drop empty ones.

    The touched masks are zeroed in place: the dataset builds the masks anew for every sample,
    and a copy of all of them (hundreds of megabytes on a dense image) would cost more than
    the whole augmentation.
    """
    x1, y1, x2, y2 = region
    boxes = target["boxes"].as_subclass(torch.Tensor).clone()
    masks = target["masks"].as_subclass(torch.Tensor)
    area = target["area"].clone()
    touched = (boxes[:, 0] < x2) & (boxes[:, 2] > x1) & (boxes[:, 1] < y2) & (boxes[:, 3] > y1)
    keep = torch.ones(len(boxes), dtype=torch.bool)
    for i in touched.nonzero().flatten().tolist():
        masks[i, y1:y2, x1:x2] = 0
        bx1, by1, bx2, by2 = (int(v) for v in boxes[i])
        box, nonempty = mask_boxes(masks[i:i + 1, by1:by2, bx1:bx2])  # only inside the old box
        boxes[i] = box[0] + torch.tensor([bx1, by1, bx1, by1], dtype=box.dtype)
        area[i] = float(masks[i, by1:by2, bx1:bx2].sum())
        keep[i] = bool(nonempty[0])
    out = dict(target)
    if not keep.all():
        masks = masks[keep]
        out.update(labels=target["labels"][keep], iscrowd=target["iscrowd"][keep])
    out["boxes"] = tv_tensors.BoundingBoxes(boxes[keep], format="XYXY", canvas_size=tuple(masks.shape[-2:]))
    out["masks"] = tv_tensors.Mask(masks)
    out["area"] = area[keep]
    return out


def mask_boxes(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes with exclusive max from masks [N, H, W], and which masks have any pixel."""
    masks = masks.bool()
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    nonempty = rows.any(dim=1)
    height, width = masks.shape[-2:]
    ys = torch.arange(height)
    xs = torch.arange(width)
    y1 = torch.where(rows, ys, height).min(dim=1).values
    y2 = torch.where(rows, ys, -1).max(dim=1).values + 1
    x1 = torch.where(cols, xs, width).min(dim=1).values
    x2 = torch.where(cols, xs, -1).max(dim=1).values + 1
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    boxes[~nonempty] = 0
    return boxes, nonempty
