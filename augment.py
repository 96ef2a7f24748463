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
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from skimage import color
from torchvision.transforms import v2

from argtypes import chance, non_negative, non_negative_int
from dataloader import Instances

Op = Callable[[torch.Tensor, Instances], tuple[torch.Tensor, Instances]]


def add_augment_args(parser: argparse.ArgumentParser) -> None:
    """The augmentation flags, shared by both train scripts."""
    group = parser.add_argument_group("augmentation")
    group.add_argument("--hflip_p", type=chance, default=0.5, help="probability of a horizontal flip")
    group.add_argument("--vflip_p", type=chance, default=0.5, help="probability of a vertical flip")
    group.add_argument("--jitter_p", type=chance, default=0.8, help="probability of colour jitter")
    group.add_argument("--brightness", type=non_negative, default=0.2, help="colour jitter brightness")
    group.add_argument("--contrast", type=non_negative, default=0.2, help="colour jitter contrast")
    group.add_argument("--saturation", type=non_negative, default=0.2, help="colour jitter saturation")
    group.add_argument("--transpose_p", type=chance, default=0.0,
                       help="probability of swapping rows and columns (a mirror across the diagonal, a 90 degree "
                            "turn with a flip): with the flips, all 8 symmetries of the square, since a slide has "
                            "no up (0: off)")
    group.add_argument("--hed_p", type=chance, default=0.0,
                       help="probability of a stain jitter in HED space (haematoxylin, eosin, DAB; Tellez et al. "
                            "2018): each stain scaled by U(1 - s, 1 + s) and shifted by U(-s, s), s = --hed_sigma "
                            "(0: off)")
    group.add_argument("--hed_sigma", type=non_negative, default=0.05, help="strength of --hed_p's stain jitter")
    group.add_argument("--copy_paste", type=chance, default=0.0,
                       help="probability of pasting cells of a random training window (Simple Copy-Paste, Ghiasi "
                            "et al. 2021; any training image, this one too) at random places of a training window, "
                            "over what lies there (0: off)")
    group.add_argument("--copy_paste_cells", type=non_negative_int, default=8,
                       help="most cells --copy_paste pastes at once")
    group.add_argument("--copy_paste_rare", action="store_true",
                       help="pick the pasted cells by 1 / sqrt(their class's share of the instances), so rare "
                            "classes are pasted more often (--class_balance's weights); it chooses among the donor "
                            "window's cells only where it holds more than --copy_paste_cells")
    group.add_argument("--cutout_p", type=chance, default=0.5, help="probability of one CutOut square")
    group.add_argument("--cutout_size", type=non_negative_int, default=50, help="CutOut square side in pixels")
    group.add_argument("--crop", type=non_negative_int, default=256,
                       help="train on random SIZE x SIZE windows, each scaled by --input_scale (0: whole images)")
    group.add_argument("--no_augment", action="store_true",
                       help="no flips, jitter, cutout, rotations, stain jitter or pasting (--crop windows stay)")


def build_train_transforms(args: argparse.Namespace, donors: "Donors | None" = None) -> "Compose | None":
    """The training pipeline from the flags of ``add_augment_args``; ``donors`` gives the cells
    ``--copy_paste`` pastes (the training set's ``donor``, with the class weights of its picks)."""
    if args.no_augment:
        return None
    jitter = v2.ColorJitter(brightness=args.brightness, contrast=args.contrast, saturation=args.saturation)
    ops: list[Op] = []
    if getattr(args, "copy_paste", 0.0) > 0 and donors is not None:  # first: pasted cells get the rest too
        ops.append(CopyPaste(donors, args.copy_paste, args.copy_paste_cells))
    ops.append(ImageOnly(v2.RandomApply([jitter], p=args.jitter_p)))
    if getattr(args, "hed_p", 0.0) > 0:
        ops.append(HedJitter(args.hed_sigma, args.hed_p))
    ops += [RandomFlip(horizontal=True, p=args.hflip_p), RandomFlip(horizontal=False, p=args.vflip_p)]
    if getattr(args, "transpose_p", 0.0) > 0:
        ops.append(RandomTranspose(args.transpose_p))
    return Compose([*ops, CutOut(size=args.cutout_size, p=args.cutout_p)])


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


class RandomTranspose:
    """Rows and columns of the image and its instances swapped, with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: torch.Tensor, inst: Instances) -> tuple[torch.Tensor, Instances]:
        if torch.rand(()) >= self.p:
            return image, inst
        return image.transpose(-1, -2), inst.transposed()


class HedJitter:
    """Stain augmentation: the image in haematoxylin-eosin-DAB optical densities
    (``skimage.color.rgb2hed``), each stain scaled and shifted at random, and back to RGB. The
    change is added to the image rather than the round trip returned: ``rgb2hed`` clips stain
    densities below 0, so a grey or non-H&E colour came back altered even with no jitter."""

    def __init__(self, sigma: float = 0.05, p: float = 1.0) -> None:
        self.sigma = sigma
        self.p = p

    def __call__(self, image: torch.Tensor, inst: Instances) -> tuple[torch.Tensor, Instances]:
        if torch.rand(()) >= self.p:
            return image, inst
        scale = 1.0 + (torch.rand(3) * 2 - 1) * self.sigma
        shift = (torch.rand(3) * 2 - 1) * self.sigma
        pixels = image.permute(1, 2, 0).numpy()
        hed = color.rgb2hed(pixels)
        rgb = pixels + color.hed2rgb(hed * scale.numpy() + shift.numpy()) - color.hed2rgb(hed)
        return torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1).clamp(0.0, 1.0).contiguous(), inst


class Donors(NamedTuple):
    """Where pasted cells come from: ``sample()`` gives a random training window (image [3, H,
    W] and instances), ``weights`` each class's chance of being picked (index = class)."""

    sample: Callable[[], tuple[torch.Tensor, Instances]]
    weights: Sequence[float]


class CopyPaste:
    """Cells of another training window pasted at random places, with probability ``p``: up
    to ``cells`` of them, picked by their class's weight, each placed whole (its pixels over
    what lies there, taken from the instances below); a cell larger than the window is skipped."""

    def __init__(self, donors: Donors, p: float = 0.5, cells: int = 8) -> None:
        self.donors = donors
        self.p = p
        self.cells = cells

    def __call__(self, image: torch.Tensor, inst: Instances) -> tuple[torch.Tensor, Instances]:
        if self.cells <= 0 or torch.rand(()) >= self.p:
            return image, inst
        donor_image, donor = self.donors.sample()
        if len(donor) == 0:
            return image, inst
        weights = torch.tensor([float(self.donors.weights[int(c)]) for c in donor.labels])
        count = min(self.cells, int((weights > 0).sum()))
        if count == 0:
            return image, inst
        picks = torch.multinomial(weights, count, replacement=False).tolist()
        image = image.clone()
        height, width = image.shape[-2:]
        for k in picks:  # a few cells, on the host, in a DataLoader worker
            (bx0, by0, bx1, by1), crop = donor.boxes[k], donor.crops[k]
            h, w = crop.shape
            if h > height or w > width:
                continue
            y0, x0 = int(torch.randint(0, height - h + 1, ())), int(torch.randint(0, width - w + 1, ()))
            shape = torch.from_numpy(np.ascontiguousarray(crop))
            window = image[:, y0:y0 + h, x0:x0 + w]
            image[:, y0:y0 + h, x0:x0 + w] = torch.where(shape, donor_image[:, by0:by1, bx0:bx1], window)
            inst = inst.with_cell(int(donor.labels[k]), x0, y0, np.ascontiguousarray(crop))
        return image, inst


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
