"""Images larger than memory, predicted window by window: a whole-slide region of 50,000
nuclei never sits in memory at once, neither its pixels nor its masks.

An image is read lazily (``LazyImage``: a memory map of an uncompressed TIFF, tifffile's zarr
store of a compressed or tiled one), cut into overlapping windows of at most ``window`` pixels a
side, and each window is predicted like a whole image of its own (tiles batched on the device,
``predictor.predict_images``). Windows start on the image's tile grid, so a window's tiles are
the whole image's, except the last of each row and column, which sits flush with the window's
inner end. Neighbours overlap by at least 2 x (a tile + ``CELL_MARGIN``), with a boundary in the
middle of the overlap: a window keeps the cells whose box centre lies on its side of those
boundaries (its *core*), at least a tile + ``CELL_MARGIN`` px from its inner edges, out of reach
of that flush tile. A cell cut by a window's edge has its centre outside that window's core, and
its whole copy in the neighbour's core, as long as it is narrower than 2 x ``CELL_MARGIN``.

Each window's cells come back on the host, ready to be written (``inference.py`` appends them
to the submission, the GeoJSON and the CSV before the next window is read), so peak host and
device memory depend on the window, not the image. A strip-compressed TIFF's strips span the
whole width, so they are decoded once per column of windows; a tiled TIFF decodes each tile
about once.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import tifffile
import torch
import zarr

from dataloader import (TIFF_SUFFIXES, as_stored, channels_first, float_peak, note_dim_range, raw_pixels,
                        read_raw_image, tiff_pixels, to_float_rgb)
from devices import autocast
from errors import DatasetError, UsageError
from masks import PackedMasks
from merging import take
from predictor import Settings, on_host, predict_images
from progress import progress
from tiling import tile_stride

# Beyond the tile, how far a window's core stays from its inner edges: half the widest cell kept whole.
CELL_MARGIN = 128


class Span(NamedTuple):
    """A window along one axis, [start, stop), and its core, [core_start, core_stop)."""

    start: int
    stop: int
    core_start: int
    core_stop: int


class Part(NamedTuple):
    """One window of an image: its top-left corner ``origin`` (y, x), its ``pixels`` as
    ``read_raw_image`` gives them, its detections ``dets`` in window coordinates
    (``predictor.predict_images``' form, on the host), and ``core``, bool per detection: the
    cells this window owns."""

    origin: tuple[int, int]
    pixels: np.ndarray
    dets: dict
    core: torch.Tensor

    def cells(self, size: tuple[int, int]) -> dict:
        """The window's own cells in the coordinates of the image of ``size`` (H, W), in their order."""
        keep = self.core.nonzero().flatten()
        masks = take(self.dets["masks"], keep)
        y0, x0 = self.origin
        return {"boxes": _shifted(self.dets["boxes"][keep].float(), y0, x0), "scores": self.dets["scores"][keep],
                "labels": self.dets["labels"][keep],
                "masks": PackedMasks(masks.data, _shifted(masks.boxes, y0, x0), masks.offsets, size),
                "image_size": size}


class LazyImage:
    """An image whose windows are decoded on demand. TIFF (also BigTIFF, tiled, pyramidal:
    the full-resolution level) is memory-mapped when uncompressed, else read through
    tifffile's zarr store, which decodes only the strips or tiles a window touches. PNG and
    JPEG cannot be read in parts and are decoded whole."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._store = None
        self._as_pixels: Callable[[np.ndarray], np.ndarray] = as_stored
        if self.path.suffix.lower() not in TIFF_SUFFIXES:
            self._array: Any = read_raw_image(self.path)
        else:
            self._as_pixels = tiff_pixels(self.path)
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
        self._channels_first = channels_first(shape)
        self.size: tuple[int, int] = (shape[1], shape[2]) if self._channels_first else (shape[0], shape[1])
        self._peak: float | None = None

    def read(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        """The pixels of [y0, y1) x [x0, x1) as ``dataloader.read_raw_image`` gives a whole image."""
        part = self._array[:, y0:y1, x0:x1] if self._channels_first else self._array[y0:y1, x0:x1]
        return raw_pixels(self._as_pixels(np.asarray(part)), self.path)

    def peak(self) -> float | None:
        """The brightest value of a float image (None for integer pixels, scaled by their dtype),
        found once, in bands of rows: every window is scaled by it, as the whole image would be."""
        if self._peak is None and np.issubdtype(self._array.dtype, np.floating):
            height, width = self.size
            band = max(1, (1 << 26) // max(width, 1))
            bands = progress(range(0, height, band), f"{self.path.name}: brightest pixel",
                             show=height > band * 4)  # a slide: minutes of reading before its windows start
            self._peak = max(float_peak(self.read(y, 0, min(y + band, height), width)) or 0.0 for y in bands)
            note_dim_range(self._array.dtype, self._peak, self.path)
        return self._peak

    def close(self) -> None:
        """Close the TIFF file behind the zarr store, if one was opened."""
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
    stride = tile_stride(tile, overlap) if tile > 0 else 1
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


def window_count(size: tuple[int, int], window: int, tile: int, overlap: float) -> int:
    """How many windows ``stream_image`` cuts an image of ``size`` (H, W) into."""
    return len(window_spans(size[0], window, tile, overlap)) * len(window_spans(size[1], window, tile, overlap))


def stream_image(image: LazyImage, predict_window: Callable[[np.ndarray], dict], window: int, tile: int,
                 overlap: float) -> Iterator[Part]:
    """Each window of ``image`` with its detections, window after window (rows of windows, top
    to bottom). ``predict_window(pixels)`` returns a window's merged detections in window
    coordinates (``predictor.predict_images``' form; ``model_predictor`` builds it from models)."""
    height, width = image.size
    for ys in window_spans(height, window, tile, overlap):
        for xs in window_spans(width, window, tile, overlap):
            pixels = image.read(ys.start, xs.start, ys.stop, xs.stop)
            dets = on_host([predict_window(pixels)])[0]
            yield Part((ys.start, xs.start), pixels, dets, core_of(dets["boxes"], ys, xs))
            del pixels, dets
            _return_freed_memory()


def core_of(boxes: torch.Tensor, ys: Span, xs: Span) -> torch.Tensor:
    """Bool per box (window coordinates) of the window ``ys`` x ``xs``: its centre lies in the core."""
    cx = (boxes[:, 0] + boxes[:, 2]) / 2 + xs.start
    cy = (boxes[:, 1] + boxes[:, 3]) / 2 + ys.start
    return (cx >= xs.core_start) & (cx < xs.core_stop) & (cy >= ys.core_start) & (cy < ys.core_stop)


def model_predictor(models: list[torch.nn.Module], device: torch.device, settings: Settings,
                    image: LazyImage) -> Callable[[np.ndarray], dict]:
    """``predict_window`` for ``stream_image``: a window's pixels of ``image`` predicted by
    ``models`` (an ensemble when several) with ``settings`` (resolved: tiles, views, caps per window)."""
    nets = [getattr(m, "module", m).eval() for m in models]
    peak = image.peak()

    @torch.no_grad()
    def predict_window(pixels: np.ndarray) -> dict:
        window = torch.from_numpy(to_float_rgb(pixels, image.path, peak)).permute(2, 0, 1).contiguous()
        if device.type == "cuda":
            window = window.pin_memory()
        with autocast(device, settings.use_amp):
            return predict_images(nets, [window.to(device, non_blocking=True)], settings)[0]

    return predict_window


def _return_freed_memory() -> None:
    """Hand the memory a finished window freed back to the system (glibc's ``malloc_trim``;
    a no-op elsewhere). Each window allocates and frees a few hundred MB of arrays of varied
    sizes; without it the allocator's heap grows over the first windows (measured in
    benchmarks/RESULTS.md), so peak memory crept up with the number of windows."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _shifted(boxes: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    out = boxes.clone()
    out[:, 0::2] += dx
    out[:, 1::2] += dy
    return out
