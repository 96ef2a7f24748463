from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import project_masks_on_boxes as STOCK_PROJECT_MASKS

from detector import project_masks_on_boxes, resize_masks
from masks import PackedMasks

H, W = 37, 53


def _packed(seed: int = 0, n: int = 20) -> PackedMasks:
    rng = np.random.default_rng(seed)
    crops, boxes = [], []
    for _ in range(n):
        x1, y1 = int(rng.integers(0, W - 1)), int(rng.integers(0, H - 1))
        x2, y2 = int(rng.integers(x1 + 1, W + 1)), int(rng.integers(y1 + 1, H + 1))
        crop = rng.random((y2 - y1, x2 - x1)) > 0.4
        crops.append(crop[:, ::-1] if len(crops) % 2 else crop)  # flipped views pack like any crop
        boxes.append((x1, y1, x2, y2))
    return PackedMasks.from_crops(crops, np.array(boxes), (H, W))


def test_full_places_every_crop_in_its_box() -> None:
    packed = _packed()
    full = packed.full()
    assert full.shape == packed.shape == (20, H, W) and full.dtype == torch.uint8
    for i, (x1, y1, x2, y2) in enumerate(packed.boxes.tolist()):
        assert torch.equal(full[i, y1:y2, x1:x2], packed.crop(i))
        assert full[i].sum() == packed.crop(i).sum()  # nothing outside the box


@pytest.mark.parametrize("window", [(0, 0, W, H), (5, 6, 20, 30), (50, 30, 53, 37), (0, 0, 1, 1)])
def test_region_is_the_full_mask_through_a_window(window: tuple[int, int, int, int]) -> None:
    packed = _packed(1)
    full = packed.full()
    x0, y0, x1, y1 = window
    for i in range(len(packed)):
        assert torch.equal(packed.region(i, x0, y0, x1, y1), full[i, y0:y1, x0:x1])


@pytest.mark.parametrize("size", [(20, 30), (74, 106), (H, W), (50, 41), (3, 4)])
def test_resize_matches_nearest_interpolation_of_full_masks(size: tuple[int, int]) -> None:
    packed = _packed(2)
    resized = packed.resized(size)
    assert resized.shape == (20, *size)
    assert torch.equal(resized.full(), resize_masks(packed.full(), size))


def test_empty_masks() -> None:
    empty = PackedMasks.from_crops([], np.zeros((0, 4)), (H, W))
    assert empty.shape == (0, H, W) and empty.full().shape == (0, H, W)
    assert empty.resized((10, 12)).shape == (0, 10, 12)


def test_mask_targets_from_packed_equal_torchvision() -> None:
    packed = _packed(3)
    rng = np.random.default_rng(3)
    matched = torch.as_tensor(rng.integers(0, len(packed), 60))
    rois = []
    for j in matched.tolist():  # RoIs around their instance's box, some reaching past the image
        box = packed.boxes[j].float()
        rois.append(box + torch.as_tensor(rng.normal(0, 3, 4), dtype=torch.float32))
    rois = torch.stack(rois)
    expected = STOCK_PROJECT_MASKS(packed.full(), rois, matched, 28)
    # the crop shifts RoI coordinates, so roi_align rounds differently in the last float bits
    assert torch.allclose(project_masks_on_boxes(packed, rois, matched, 28), expected, atol=1e-5)
    assert torch.allclose(project_masks_on_boxes(packed.full(), rois, matched, 28), expected, atol=1e-5)


@pytest.mark.parametrize("seed", range(8))
def test_mask_targets_at_image_edges_equal_torchvision(seed: int) -> None:
    """Boxes on the image border and RoIs reaching past it: the canvas must keep roi_align's
    border clamping where the image ends and zeros where it goes on."""
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(5, 60)), int(rng.integers(5, 60))
    crops, boxes = [], []
    for _ in range(15):
        x1 = 0 if rng.random() < 0.3 else int(rng.integers(0, width - 1))
        y1 = 0 if rng.random() < 0.3 else int(rng.integers(0, height - 1))
        x2 = width if rng.random() < 0.3 else int(rng.integers(x1 + 1, width + 1))
        y2 = height if rng.random() < 0.3 else int(rng.integers(y1 + 1, height + 1))
        crops.append(rng.random((y2 - y1, x2 - x1)) > 0.3)
        boxes.append((x1, y1, x2, y2))
    packed = PackedMasks.from_crops(crops, np.array(boxes), (height, width))
    matched = torch.as_tensor(rng.integers(0, len(packed), 80))
    rois = packed.boxes[matched].float() + torch.as_tensor(rng.normal(0, 4, (80, 4)), dtype=torch.float32)
    rois[:, 2:] = torch.maximum(rois[:, 2:], rois[:, :2] + 0.5)
    expected = STOCK_PROJECT_MASKS(packed.full(), rois, matched, 28)
    assert torch.allclose(project_masks_on_boxes(packed, rois, matched, 28), expected, atol=1e-5)
    assert torch.equal(project_masks_on_boxes(packed.full(), rois, matched, 28), expected)


def test_resize_and_mask_targets_wait_for_no_device_result() -> None:
    """No op that would make the host wait for a GPU (item, nonzero, boolean masks...),
    whatever the instance count: both run on every training step."""
    from benchmarks.host_syncs import SyncCounter

    packed = _packed(4, n=40)
    matched = torch.arange(40).repeat(2)
    rois = packed.boxes[matched].float() + 0.5
    with SyncCounter(torch.device("cpu")) as counter:
        packed.resized((74, 106))
        project_masks_on_boxes(packed, rois, matched, 28)
    assert counter.total() == 0, counter.top_sites()
    assert counter.ops > 0


def test_copy_counter_sees_blocking_host_to_device_copies() -> None:
    """benchmarks/host_syncs.py's CopyCounter labels tensors as CUDA would place them: a copy
    of Python data or of a host tensor to the device, ``new_tensor`` and list indexing of a
    device tensor count; ops between device tensors and non-blocking copies do not."""
    from benchmarks.host_syncs import CopyCounter

    weight = torch.ones(3)
    host, pinned = torch.from_numpy(np.arange(3.0)), torch.zeros(2)  # (a CPU .to() returns the tensor itself)
    with CopyCounter([weight]) as copies:
        on_device = weight * 2  # device op: a device result
        torch.tensor([1.0, 2.0], device="cpu")
        on_device.new_tensor([0.5])
        host.to("cpu")
        pinned.to("cpu", non_blocking=True)
        on_device[[0, 2]]
        on_device.to("cpu")  # already on the device: no copy
        on_device + weight
    assert copies.total() == 4
    assert copies.kinds[CopyCounter.NON_BLOCKING] == 1
