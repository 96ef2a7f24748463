"""Paired image + instance augmentation for training.

Every op takes and returns ``(image [3, H, W], dataloader.Instances)``: geometric ops move the
compact per-box mask crops with the image, so their cost does not grow with the number of
full-image masks a dense sample stands for (a v2 flip of 800 masks at 1000x1000 copies
800 MB). Colour ops are torchvision.transforms.v2 on the image alone. The dataset renders
torchvision's target dict after the last op. CutOut is the one op that erases pixels: it
re-boxes the instances it touches and drops those left with no pixel, so a box never
outlives its mask.
"""
from __future__ import annotations

import argparse
from typing import Callable, Sequence

import torch
from torchvision.transforms import v2

from dataloader import Instances

Op = Callable[[torch.Tensor, Instances], tuple[torch.Tensor, Instances]]


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
    group.add_argument("--crop", type=int, default=256,
                       help="train on random SIZE x SIZE windows, each scaled by --input_scale (0: whole images)")
    group.add_argument("--no_augment", action="store_true", help="train without any augmentation")


def build_train_transforms(args: argparse.Namespace) -> "Compose | None":
    """The training pipeline from the flags of ``add_augment_args``."""
    if args.no_augment:
        return None
    jitter = v2.ColorJitter(brightness=args.brightness, contrast=args.contrast, saturation=args.saturation)
    return Compose([
        ImageOnly(v2.RandomApply([jitter], p=args.jitter_p)),
        RandomFlip(horizontal=True, p=args.hflip_p),
        RandomFlip(horizontal=False, p=args.vflip_p),
        CutOut(size=args.cutout_size, p=args.cutout_p),
    ])


def build_crop_window(args: argparse.Namespace) -> "RandomWindow | None":
    """The random training window of ``--crop``, or None for whole images."""
    return RandomWindow(args.crop) if args.crop > 0 else None


class Compose:
    """Ops applied in order to ``(image, instances)``."""

    def __init__(self, ops: Sequence[Op]) -> None:
        self.transforms = list(ops)

    def __call__(self, image: torch.Tensor, inst: Instances) -> tuple[torch.Tensor, Instances]:
        for op in self.transforms:
            image, inst = op(image, inst)
        return image, inst


class ImageOnly:
    """A v2 photometric transform applied to the image; the instances do not move."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: torch.Tensor, inst: Instances) -> tuple[torch.Tensor, Instances]:
        return self.transform(image), inst


class RandomFlip:
    """Left-right (``horizontal``) or top-bottom flip of the image and its instances."""

    def __init__(self, horizontal: bool, p: float = 0.5) -> None:
        self.horizontal = horizontal
        self.p = p

    def __call__(self, image: torch.Tensor, inst: Instances) -> tuple[torch.Tensor, Instances]:
        if torch.rand(()) >= self.p:
            return image, inst
        return image.flip(-1 if self.horizontal else -2), inst.flipped(self.horizontal)


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
    """Zero one ``size`` x ``size`` square in the image and in every mask it meets."""

    def __init__(self, size: int = 50, p: float = 0.5) -> None:
        self.size = size
        self.p = p

    def __call__(self, image: torch.Tensor, inst: Instances) -> tuple[torch.Tensor, Instances]:
        if self.size <= 0 or torch.rand(()) >= self.p:
            return image, inst
        height, width = image.shape[-2:]
        cy = int(torch.randint(0, height, ()))
        cx = int(torch.randint(0, width, ()))
        y1, y2 = max(cy - self.size // 2, 0), min(cy + (self.size + 1) // 2, height)
        x1, x2 = max(cx - self.size // 2, 0), min(cx + (self.size + 1) // 2, width)
        image = image.clone()
        image[..., y1:y2, x1:x2] = 0
        return image, inst.erased(x1, y1, x2, y2)
