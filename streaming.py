"""Images larger than memory, predicted window by window: a whole-slide region of 50,000
nuclei never sits in memory at once, neither its pixels nor its masks.

An image is read lazily (``LazyImage``: a memory map of an uncompressed TIFF, tifffile's zarr
store of a compressed or tiled one), cut into overlapping windows of about ``window`` pixels a
side, and each window is predicted like a whole image of its own (tiles batched on the
device, ``predictor.predict_images``). Windows start on the image's tile grid, so a window's
tiles are the tiles the whole image would have had, and neighbours overlap by at least a tile
plus 128 px on each side of a boundary in the middle of the overlap. A window keeps the cells
whose box centre lies on its side of those boundaries (its *core*): a cell cut by a window's
edge has its centre outside that window's core, and its whole copy lies in the neighbour's.
Cells wider than the margin (a tile plus 128 px) may be cut.

Each window's cells come back in image coordinates, ready to be written (``inference.py``
appends them to the submission, the GeoJSON and the CSV before the next window is read), so
peak host and device memory depend on the window, not the image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import tifffile
import torch
import zarr

from dataloader import TIFF_SUFFIXES, raw_pixels, read_raw_image, to_float_rgb
from devices import autocast
from errors import DatasetError, UsageError
from masks import PackedMasks
from merging import take
from predictor import Settings, predict_images

# Beyond the tile, how far a window's core stays from its inner edges: half the widest cell kept whole.
CELL_MARGIN = 128


class Span(NamedTuple):
    """A window along one axis, [start, stop), and its core, [core_start, core_stop)."""

    start: int
    stop: int
    core_start: int
    core_stop: int


class Part(NamedTuple):
    """One window's share of an image: its cells (``dets``: boxes, scores, labels and
    ``PackedMasks`` in image coordinates, ``image_size`` the image's), its top-left corner
    ``origin`` (y, x) and its ``pixels`` as stored, for the per-cell outputs."""

    origin: tuple[int, int]
    pixels: np.ndarray
    dets: dict


class LazyImage:
    """An image whose windows are decoded on demand. TIFF (also BigTIFF, tiled, pyramidal:
    the full-resolution level) is memory-mapped when uncompressed, else read through
    tifffile's zarr store, which decodes only the strips or tiles a window touches. PNG and
    JPEG cannot be read in parts and are decoded whole."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._store = None
        if self.path.suffix.lower() not in TIFF_SUFFIXES:
            self._array: Any = read_raw_image(self.path)
        else:
            try:
                self._array = tifffile.memmap(self.path, mode="r")
            except (ValueError, OSError):  # compressed, tiled or not contiguous: decoded per segment
                try:
                    self._store = tifffile.imread(self.path, aszarr=True, level=0)
                    self._array = zarr.open(self._store, mode="r")
                except Exception as err:  # tifffile raises many types for a corrupt file
                    raise DatasetError(f"{self.path}: cannot read this TIFF in windows ({type(err).__name__}: "
                                       f"{err}); re-export it, or pass --window 0 to read it whole.") from err
        shape = tuple(self._array.shape)
        self._channels_first = len(shape) == 3 and shape[2] > 4 and shape[0] <= 4
        self.size: tuple[int, int] = (shape[1], shape[2]) if self._channels_first else (shape[0], shape[1])

    def read(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        """The pixels of [y0, y1) x [x0, x1) as ``dataloader.read_raw_image`` gives a whole image."""
        part = self._array[:, y0:y1, x0:x1] if self._channels_first else self._array[y0:y1, x0:x1]
        return raw_pixels(np.asarray(part), self.path)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def __enter__(self) -> "LazyImage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def window_spans(length: int, window: int, tile: int, overlap: float) -> list[Span]:
    """The windows along an axis of ``length`` pixels: at most ``window`` long, starting on the
    tile grid (multiples of the tile stride, ``tiling.tile_grid``), neighbours overlapping by
    at least 2 x (tile + ``CELL_MARGIN``), each core ending midway through the overlap."""
    if length <= window:
        return [Span(0, length, 0, length)]
    margin = tile + CELL_MARGIN
    stride = max(int(tile * (1.0 - overlap)), 1) if tile > 0 else 1
    step = (window - 2 * margin) // stride * stride
    if step <= 0:
        raise UsageError(f"--window {window} is too small for tiles of {tile} px: a window needs at least "
                         f"{2 * margin + stride} px (2 x (tile + {CELL_MARGIN}) + the tile stride)")
    starts = [0]
    while starts[-1] + window < length:
        starts.append(starts[-1] + step)
    stops = [min(s + window, length) for s in starts]
    cuts = [0] + [(starts[i + 1] + stops[i]) // 2 for i in range(len(starts) - 1)] + [length]
    return [Span(s, e, cuts[i], cuts[i + 1]) for i, (s, e) in enumerate(zip(starts, stops))]


def stream_image(image: LazyImage, predict_window: Callable[[np.ndarray], dict], window: int, tile: int,
                 overlap: float) -> Iterator[Part]:
    """Each window's cells of ``image``, window after window (rows of windows, top to bottom).
    ``predict_window(pixels)`` returns a window's merged detections in window coordinates
    (``predictor.predict_images``' form; ``model_predictor`` builds it from models)."""
    height, width = image.size
    for ys in window_spans(height, window, tile, overlap):
        for xs in window_spans(width, window, tile, overlap):
            pixels = image.read(ys.start, xs.start, ys.stop, xs.stop)
            dets = predict_window(pixels)
            yield Part((ys.start, xs.start), pixels, in_core(dets, ys, xs, (height, width)))


def in_core(dets: dict, ys: Span, xs: Span, size: tuple[int, int]) -> dict:
    """The detections of the window ``ys`` x ``xs`` whose box centre lies in its core, moved
    to image coordinates (``size`` the image's), in their order."""
    boxes = dets["boxes"]
    cx = (boxes[:, 0] + boxes[:, 2]) / 2 + xs.start  # Python offsets: no host-to-device copy
    cy = (boxes[:, 1] + boxes[:, 3]) / 2 + ys.start
    inside = (cx >= xs.core_start) & (cx < xs.core_stop) & (cy >= ys.core_start) & (cy < ys.core_stop)
    keep = inside.nonzero().flatten()  # host sync: which cells the window keeps, once per window
    masks = take(dets["masks"], keep.to(dets["masks"].offsets.device))
    return {"boxes": _shifted(boxes[keep].float(), ys.start, xs.start), "scores": dets["scores"][keep],
            "labels": dets["labels"][keep],
            "masks": PackedMasks(masks.data, _shifted(masks.boxes, ys.start, xs.start), masks.offsets, size),
            "image_size": size}


def model_predictor(models: list[torch.nn.Module], device: torch.device, settings: Settings,
                    path: Path) -> Callable[[np.ndarray], dict]:
    """``predict_window`` for ``stream_image``: a window's pixels predicted by ``models`` (an
    ensemble when several) with ``settings`` (resolved: tiles, views, caps per window)."""
    nets = [getattr(m, "module", m).eval() for m in models]

    @torch.no_grad()
    def predict_window(pixels: np.ndarray) -> dict:
        image = torch.from_numpy(to_float_rgb(pixels, path)).permute(2, 0, 1).contiguous()
        if device.type == "cuda":
            image = image.pin_memory()
        with autocast(device, settings.use_amp):
            return predict_images(nets, [image.to(device, non_blocking=True)], settings)[0]

    return predict_window


def _shifted(boxes: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    out = boxes.clone()
    out[:, 0::2] += dx
    out[:, 1::2] += dy
    return out
