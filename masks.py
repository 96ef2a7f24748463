"""Ground-truth instance masks of one image, packed: each mask only inside its box.

torchvision's target contract holds ``masks`` as a uint8 ``[N, H, W]`` tensor: 800 cells of a
1000x1000 image are 800 MB, written for every sample, copied into shared memory by every
DataLoader worker and moved to the GPU, although Mask R-CNN only ever reads each mask inside
the RoIs matched to it. ``PackedMasks`` keeps the same masks as crops in one flat buffer (a
few hundred kilobytes) and answers the only questions the model asks: the shape, one mask
inside a window (``detector.project_masks_on_boxes``) and a nearest resize
(``detector.CellTransform``). ``full()`` gives the contract's tensor where one is needed.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from devices import scale_boxes, to_device


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

    def canvases(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks ``index`` (a tensor on any device, repeats allowed) as one uint8 stack
        [len(index), Hc, Wc], each on a zero canvas, and the image (x, y) of each canvas origin.

        Every mask is zero outside its box, so a canvas one pixel larger than the box on each
        side where the image goes on reads like the full mask for bilinear sampling; a box that
        touches an image edge keeps that edge on the canvas edge, so roi_align's border rules
        (clamp within a pixel of the edge, zero beyond) act there as on the full image. The
        canvas size comes from the boxes on the host: one gather, no host sync."""
        x1, y1, x2, y2 = self.boxes.numpy().T
        (ox, width), (oy, height) = _placement(x1, x2, self.size[1]), _placement(y1, y2, self.size[0])
        params = np.stack([x1 - ox, y1 - oy, x2 - x1, y2 - y1, self.offsets.numpy()[:-1], ox, oy], axis=1)
        device = index.device
        dx, dy, w, h, start, ox, oy = to_device(params, device)[index].t()[:, :, None, None]
        u = torch.arange(height, device=device)[None, :, None] - dy
        v = torch.arange(width, device=device)[None, None, :] - dx
        inside = (u >= 0) & (u < h) & (v >= 0) & (v < w)
        pixels = self.data[start + u.clamp(min=0).minimum(h - 1) * w + v.clamp(min=0).minimum(w - 1)]
        origin = torch.stack([ox, oy], dim=1).reshape(-1, 2)
        return pixels * inside, origin

    def full(self) -> torch.Tensor:
        """The contract's uint8 [N, H, W] tensor."""
        out = self.data.new_zeros(self.shape)
        for i, (x1, y1, x2, y2) in enumerate(self.boxes.tolist()):
            out[i, y1:y2, x1:x2] = self.crop(i)
        return out

    def resized(self, size: tuple[int, int]) -> "PackedMasks":
        """Nearest resize to ``size``, pixel for pixel what ``F.interpolate`` (mode nearest) does to
        the full masks: its source row and column of every output pixel, applied per crop.

        The new boxes and the source of every output row come from the boxes on the host (where
        they live, in numpy); the pixels are then gathered from ``data`` on its device in one
        indexing op: no loop over instances and no host sync, whatever the instance count."""
        rows, cols = _nearest_sources(self.size[0], size[0]), _nearest_sources(self.size[1], size[1])
        x1, y1, x2, y2 = self.boxes.numpy().T
        r0, r1, c0, c1 = (np.searchsorted(s, v) for s, v in ((rows, y1), (rows, y2), (cols, x1), (cols, x2)))
        heights, widths = r1 - r0, c1 - c0
        offsets = np.concatenate([[0], np.cumsum(heights * widths)]).astype(np.int64)
        # Per output row: the flat index in ``data`` of its source row's pixel at x = 0, where
        # the row starts in the new buffer less its first column, and its width.
        owner = np.repeat(np.arange(len(self)), heights)
        row = np.arange(len(owner)) - np.repeat(np.cumsum(heights) - heights, heights)
        base = self.offsets.numpy()[owner] + (rows[r0[owner] + row] - y1[owner]) * (x2 - x1)[owner] - x1[owner]
        start = offsets[owner] + row * widths[owner] - c0[owner]
        device = self.device
        base, start, width = to_device(np.stack([base, start, widths[owner]]).astype(np.int64), device)
        total = int(offsets[-1])
        row_of = torch.repeat_interleave(torch.arange(len(owner), device=device), width, output_size=total)
        source = base[row_of] + to_device(cols, device)[torch.arange(total, device=device) - start[row_of]]
        boxes = torch.from_numpy(np.stack([c0, r0, c1, r1], axis=1).astype(np.int64).reshape(-1, 4))
        return PackedMasks(self.data[source], boxes, torch.from_numpy(offsets), size)


def _placement(lo: np.ndarray, hi: np.ndarray, length: int) -> tuple[np.ndarray, int]:
    """Along one axis: each canvas's first image coordinate and the common canvas length, for
    boxes [lo, hi) in an image of ``length`` (see ``PackedMasks.canvases``)."""
    before, after = lo > 0, hi < length  # the image goes on before / after the box
    canvas = int((hi - lo + before + after).max()) if len(lo) else 1
    return np.where(after | ~before, lo - before, length - canvas), canvas


def _nearest_sources(length: int, new_length: int) -> np.ndarray:
    """The source index F.interpolate's nearest mode reads for each output index (non-decreasing),
    on the host: it only feeds index arithmetic with the host-side boxes."""
    ramp = torch.arange(length, dtype=torch.float64)[None, None, :, None]
    return F.interpolate(ramp, size=(int(new_length), 1))[0, 0, :, 0].long().numpy()


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


PASTE_PADDING = 1  # bins of zeros around a mask before it is resized into its box (torchvision's)


def mask_areas(masks: torch.Tensor | PackedMasks) -> torch.Tensor:
    """Pixels of each instance mask, packed or [N, H, W], as int64 [N] on the pixels' device.
    Packed: one cumulative sum read at the crop offsets, which a dataset's masks keep on the
    host (copied without blocking) and predicted ones on the device: no per-mask work, no host
    sync."""
    if not isinstance(masks, PackedMasks):
        return masks.flatten(1).sum(dim=1, dtype=torch.int64)
    total = torch.cat([masks.data.new_zeros(1, dtype=torch.int64), masks.data.cumsum(0, dtype=torch.int64)])
    ends = masks.offsets  # host offsets go without blocking; device ones (predicted masks) stay or move
    ends = to_device(ends, masks.device) if ends.device.type == "cpu" else ends.to(masks.device)
    return total[ends[1:]] - total[ends[:-1]]


def paste_boxes(boxes: torch.Tensor, mask_size: int) -> torch.Tensor:
    """The pixel boxes, int64 with x2 and y2 inclusive, that a ``mask_size`` square mask padded
    by ``PASTE_PADDING`` bins a side is resized into when pasted (torchvision's
    ``paste_masks_in_image``, ``coco.paste_masks``): each box expanded by (M + 2 padding) / M
    about its centre, truncated."""
    boxes = boxes.detach().float()
    centre, half = (boxes[:, :2] + boxes[:, 2:]) * 0.5, (boxes[:, 2:] - boxes[:, :2]) * 0.5
    half = half * ((mask_size + 2 * PASTE_PADDING) / mask_size)
    return torch.cat([centre - half, centre + half], dim=1).to(torch.int64)


def paste_frames(boxes: torch.Tensor, mask_size: int, scale: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """Where the M x M bins of a mask pasted into each box land on the image: [x1, y1, x2, y2)
    in continuous pixels, pixel k spanning [k, k + 1) (``roi_align(aligned=True)``'s reading).
    The padded mask's M + 2 bins stretch over the ``paste_boxes`` pixels, so the inner M start
    one bin in: about half a pixel wider than the box on each side, give or take the truncation.
    ``scale`` (x, y): the factor from the image's own pixels to the boxes' (the model's input
    scale); prediction pastes at the image's own resolution, so the frame is found there."""
    sx, sy = scale
    full = paste_boxes(scale_boxes(boxes, 1.0 / sx, 1.0 / sy), mask_size).to(boxes.dtype)
    span, bins = full[:, 2:] - full[:, :2] + 1, mask_size + 2 * PASTE_PADDING
    frame = torch.cat([full[:, :2] + span * PASTE_PADDING / bins, full[:, :2] + span * (bins - PASTE_PADDING) / bins],
                      dim=1)
    return scale_boxes(frame, sx, sy)
