"""Ground-truth instance masks of one image, packed: each mask only inside its box.

torchvision's target contract holds ``masks`` as a uint8 ``[N, H, W]`` tensor: 800 cells of a
1000x1000 image are 800 MB, written for every sample, copied into shared memory by every
DataLoader worker and moved to the GPU, although Mask R-CNN only ever reads each mask inside
the RoIs matched to it. ``PackedMasks`` keeps the same masks as crops in one flat buffer (a
few hundred kilobytes) and answers the only questions the model asks: the shape, one mask
inside a window (``model.project_masks_on_boxes``) and a nearest resize
(``model.CellTransform``). ``full()`` gives the contract's tensor where one is needed.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


class PackedMasks:
    """Masks as crops: ``data`` holds crop ``i`` (row-major, ``boxes[i]`` = x1, y1, x2, y2 with
    exclusive max) at ``data[offsets[i]:offsets[i + 1]]``; ``size`` is the image's (H, W)."""

    def __init__(self, data: torch.Tensor, boxes: torch.Tensor, offsets: torch.Tensor, size: tuple[int, int]) -> None:
        self.data = data
        self.boxes = boxes
        self.offsets = offsets
        self.size = (int(size[0]), int(size[1]))

    @staticmethod
    def from_crops(crops: Sequence[np.ndarray], boxes: np.ndarray, size: tuple[int, int]) -> "PackedMasks":
        """Pack bool/uint8 crops (any strides, e.g. flipped views) placed at ``boxes``."""
        flat = [np.ascontiguousarray(c, dtype=np.uint8).reshape(-1) for c in crops]
        data = np.concatenate(flat) if flat else np.zeros(0, dtype=np.uint8)
        offsets = np.concatenate([[0], np.cumsum([len(f) for f in flat], dtype=np.int64)]).astype(np.int64)
        return PackedMasks(torch.from_numpy(data), torch.as_tensor(np.asarray(boxes, dtype=np.int64).reshape(-1, 4)),
                           torch.from_numpy(offsets), size)

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.size))

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedMasks":
        """Only the pixels move: boxes and offsets are read on the host (``tolist``) anyway."""
        return PackedMasks(self.data.to(device, non_blocking=non_blocking), self.boxes, self.offsets, self.size)

    def pin_memory(self) -> "PackedMasks":
        """Called by a CUDA DataLoader with ``pin_memory=True``."""
        return PackedMasks(self.data.pin_memory(), self.boxes, self.offsets, self.size)

    def crop(self, i: int) -> torch.Tensor:
        """Mask ``i`` inside its box, [y2 - y1, x2 - x1] (a view of the buffer)."""
        x1, y1, x2, y2 = self.boxes[i].tolist()
        return self.data[int(self.offsets[i]):int(self.offsets[i + 1])].view(y2 - y1, x2 - x1)

    def region(self, i: int, x0: int, y0: int, x1: int, y1: int) -> torch.Tensor:
        """Mask ``i`` seen through the window [x0, x1) x [y0, y1) of the image, zeros outside its box."""
        out = self.data.new_zeros((y1 - y0, x1 - x0))
        bx1, by1, bx2, by2 = self.boxes[i].tolist()
        cx0, cy0, cx1, cy1 = max(bx1, x0), max(by1, y0), min(bx2, x1), min(by2, y1)
        if cx1 > cx0 and cy1 > cy0:
            out[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = self.crop(i)[cy0 - by1:cy1 - by1, cx0 - bx1:cx1 - bx1]
        return out

    def full(self) -> torch.Tensor:
        """The contract's uint8 [N, H, W] tensor."""
        out = self.data.new_zeros(self.shape)
        for i, (x1, y1, x2, y2) in enumerate(self.boxes.tolist()):
            out[i, y1:y2, x1:x2] = self.crop(i)
        return out

    def resized(self, size: tuple[int, int]) -> "PackedMasks":
        """Nearest resize to ``size``, pixel for pixel what ``F.interpolate`` (mode nearest) does to
        the full masks: its source row and column of every output pixel, applied per crop."""
        rows = _nearest_sources(self.size[0], size[0], self.device)
        cols = _nearest_sources(self.size[1], size[1], self.device)
        crops, boxes = [], []
        for i, (x1, y1, x2, y2) in enumerate(self.boxes.tolist()):
            r0, r1 = int(torch.searchsorted(rows, y1)), int(torch.searchsorted(rows, y2))
            c0, c1 = int(torch.searchsorted(cols, x1)), int(torch.searchsorted(cols, x2))
            crop = self.crop(i)[rows[r0:r1] - y1][:, cols[c0:c1] - x1]
            crops.append(crop.reshape(-1))
            boxes.append((c0, r0, c1, r1))
        data = torch.cat(crops) if crops else self.data.new_zeros(0)
        offsets = torch.tensor([0] + [len(c) for c in crops], dtype=torch.int64).cumsum(0)
        return PackedMasks(data, torch.tensor(boxes, dtype=torch.int64).reshape(-1, 4), offsets, size)


def _nearest_sources(length: int, new_length: int, device: torch.device) -> torch.Tensor:
    """The source index F.interpolate's nearest mode reads for each output index (non-decreasing)."""
    ramp = torch.arange(length, dtype=torch.float64, device=device)[None, None, :, None]
    return F.interpolate(ramp, size=(int(new_length), 1))[0, 0, :, 0].long()


def pixel_chunks(counts: torch.Tensor, budget: int) -> list[tuple[int, int, int]]:
    """(start, stop, pixels) runs of items (masks, mask pairs) whose pixel ``counts`` add up to
    about ``budget`` each, an item larger than the budget in a run of its own: batched
    per-pixel work on packed masks stays within a memory bound."""
    if len(counts) == 0:
        return []
    ends = counts.cumsum(0).cpu()  # host sync: the batch sizes (once per call)
    marks = torch.arange(1, int(ends[-1]) // budget + 1) * budget
    edges = sorted({0, len(counts), *torch.searchsorted(ends, marks, right=True).clamp(max=len(counts)).tolist()})
    return [(a, b, int(ends[b - 1] - (ends[a - 1] if a else 0))) for a, b in zip(edges[:-1], edges[1:]) if b > a]
