from __future__ import annotations

import argparse

import numpy as np
import torch

from augment import CutOut, HedJitter, RandomFlip, RandomTranspose, add_augment_args, build_train_transforms
from conftest import mask_boxes
from dataloader import Instances, render_target


def _instances() -> Instances:
    masks = np.zeros((3, 20, 30), dtype=bool)
    masks[0, 2:6, 3:8] = True
    masks[0, 5, 8] = True        # not a rectangle: flips must mirror the shape, not only the box
    masks[1, 10:12, 0:1] = True  # one pixel wide, at the left edge
    masks[2, 15:20, 20:30] = True
    boxes = mask_boxes(torch.from_numpy(masks))[0].long().numpy()
    crops = [m[y1:y2, x1:x2] for m, (x1, y1, x2, y2) in zip(masks, boxes)]
    return Instances(np.array([1, 2, 3]), boxes, crops, 20, 30)


def _check(target: dict) -> None:
    masks = target["masks"].full()
    boxes, nonempty = mask_boxes(masks)
    assert nonempty.all() and torch.equal(target["boxes"], boxes)
    assert torch.equal(target["area"], masks.flatten(1).sum(1).float())
    assert len(target["labels"]) == len(masks) == len(target["iscrowd"])


def test_mask_boxes_exclusive_max() -> None:
    masks = torch.from_numpy(_instances().masks())
    boxes, nonempty = mask_boxes(masks)
    assert boxes.tolist() == [[3, 2, 9, 6], [0, 10, 1, 12], [20, 15, 30, 20]]
    assert nonempty.all()


def test_flips_move_masks_and_boxes_with_the_image() -> None:
    inst = _instances()
    image = torch.rand(3, 20, 30)
    full = torch.from_numpy(inst.masks())
    for horizontal, dim in ((True, -1), (False, -2)):
        out_image, out = RandomFlip(horizontal, p=1.0)(image, inst)
        target = render_target(out, 1)
        assert torch.equal(out_image, image.flip(dim))
        assert torch.equal(target["masks"].full(), full.flip(dim))
        _check(target)


def test_erase_recomputes_boxes_and_drops_empty() -> None:
    out = render_target(_instances().erased(0, 0, 6, 12), 1)  # wipes instance 1, cuts instance 0
    assert out["labels"].tolist() == [1, 3]
    assert out["boxes"].tolist() == [[6, 2, 9, 6], [20, 15, 30, 20]]
    assert out["area"].tolist() == [9.0, 50.0]
    assert out["masks"].shape == (2, 20, 30) and out["masks"].full()[:, :12, :6].sum() == 0
    _check(out)


def test_erase_of_a_flipped_view_leaves_the_original_intact() -> None:
    inst = _instances()
    before = inst.masks().copy()
    inst.flipped(True).erased(0, 0, 30, 20)
    assert np.array_equal(inst.masks(), before)


def test_cutout_zeroes_image_and_keeps_invariants() -> None:
    torch.manual_seed(0)
    image = torch.rand(3, 20, 30) + 0.1
    out_image, out = CutOut(size=8, p=1.0)(image, _instances())
    zeroed = out_image == 0
    assert zeroed.sum() >= 3 * 4 * 4 and (image > 0).all()
    target = render_target(out, 1)
    assert target["masks"].full()[:, zeroed[0]].sum() == 0
    _check(target)


def test_pipeline_from_flags_invariants() -> None:
    parser = argparse.ArgumentParser()
    add_augment_args(parser)
    transforms = build_train_transforms(parser.parse_args(["--cutout_p", "1", "--cutout_size", "12"]))
    torch.manual_seed(1)
    for _ in range(20):
        out_image, out = transforms(torch.rand(3, 20, 30), _instances())
        assert out_image.shape == (3, 20, 30)
        _check(render_target(out, 1))
    assert build_train_transforms(parser.parse_args(["--no_augment"])) is None


def test_transpose_moves_masks_and_boxes_with_the_image() -> None:
    inst = _instances()
    image = torch.rand(3, 20, 30)
    out_image, out = RandomTranspose(p=1.0)(image, inst)
    target = render_target(out, 1)
    assert torch.equal(out_image, image.transpose(-1, -2)) and (out.height, out.width) == (30, 20)
    assert torch.equal(target["masks"].full(), torch.from_numpy(inst.masks()).transpose(-1, -2))
    _check(target)
    with_flip = render_target(out.flipped(horizontal=True), 1)  # transpose + flip: a 90 degree turn
    assert torch.equal(with_flip["masks"].full(), torch.from_numpy(inst.masks()).rot90(-1, (1, 2)))


def test_hed_jitter_changes_stains_and_nothing_else() -> None:
    from skimage import color

    torch.manual_seed(0)
    rgb = torch.from_numpy(color.hed2rgb(np.random.default_rng(0).uniform(0, 0.3, (20, 30, 3)))).float()
    image = rgb.permute(2, 0, 1).contiguous()
    inst = _instances()
    same, kept = HedJitter(sigma=0.0, p=1.0)(image, inst)
    assert kept is inst and torch.allclose(same, image, atol=1e-4)  # the colour round trip alone
    jittered, kept = HedJitter(sigma=0.1, p=1.0)(image, inst)
    assert kept is inst and jittered.shape == image.shape and jittered.dtype == torch.float32
    assert 0.0 <= jittered.min() and jittered.max() <= 1.0 and (jittered - image).abs().mean() > 1e-3
    assert HedJitter(sigma=0.1, p=0.0)(image, inst)[0] is image
    grey = torch.full((3, 4, 5), 0.4)  # a grey image's channels, copied: outside what rgb2hed keeps
    grey[:, :2] = 0.6
    assert torch.allclose(HedJitter(sigma=0.0, p=1.0)(grey, inst)[0], grey, atol=1e-5)  # unchanged without jitter


def test_pipeline_with_turns_and_stains_keeps_the_invariants() -> None:
    parser = argparse.ArgumentParser()
    add_augment_args(parser)
    transforms = build_train_transforms(parser.parse_args(["--transpose_p", "0.5", "--hed_p", "1"]))
    torch.manual_seed(2)
    shapes = set()
    for _ in range(12):
        out_image, out = transforms(torch.rand(3, 20, 30), _instances())
        assert out_image.shape[-2:] == (out.height, out.width)
        shapes.add(tuple(out_image.shape))
        _check(render_target(out, 1))
    assert shapes == {(3, 20, 30), (3, 30, 20)}


def test_a_pasted_cell_lies_on_top_of_the_instances_below() -> None:
    inst = _instances()
    cell = np.zeros((6, 6), dtype=bool)
    cell[1:5, 0:6] = True
    cell[0, 2:4] = cell[5, 2:4] = True  # tight: every row and column holds a pixel
    out = inst.with_cell(4, 2, 1, cell)
    target = render_target(out, 1)
    full = target["masks"].full()
    assert target["labels"].tolist()[-1] == 4 and len(out) == len(inst) + 1
    assert torch.equal(full[-1, 1:7, 2:8].bool(), torch.from_numpy(cell))
    below = full[:-1].sum(0) > 0
    assert not (below & full[-1].bool()).any()  # the pasted pixels left the instance below
    assert torch.equal(full[:-1].sum(0).bool() | full[-1].bool(), torch.from_numpy(inst.masks()).sum(0).bool()
                       | full[-1].bool())  # and nothing else changed
    _check(target)


def test_copy_paste_puts_donor_pixels_and_cells_together() -> None:
    from augment import CopyPaste, Donors

    donor_image = torch.zeros(3, 20, 30)
    donor_image[:, 15:20, 20:30] = torch.tensor([0.9, 0.1, 0.5])[:, None, None]  # instance 2 (class 3)'s pixels
    donor = _instances()
    weights = [0.0, 0.0, 0.0, 1.0, 0.0]  # only class 3 may be picked
    op = CopyPaste(Donors(lambda: (donor_image, donor), weights), p=1.0, cells=3)
    torch.manual_seed(3)
    for _ in range(5):
        image, out = op(torch.rand(3, 20, 30), _instances())
        target = render_target(out, 1)
        assert target["labels"].tolist()[-1] == 3 and 1 <= len(out) - 1 <= 3  # below: kept, cut or covered
        pasted = target["masks"].full()[-1].bool()
        assert pasted.sum() == 50 and torch.allclose(image[:, pasted].T, torch.tensor([0.9, 0.1, 0.5]))
        _check(target)
    untouched = torch.rand(3, 20, 30)
    assert CopyPaste(Donors(lambda: (donor_image, donor), weights), p=0.0)(untouched, donor)[0] is untouched
