"""Per-cell outputs for the tools biologists use, beside the COCO submission: label images in
the training layout (to correct and train on, or open in napari), a QuPath GeoJSON per image
and one measurement table (CSV) for all images.

All three come from one painted canvas per image (``coco.paint``): each pixel belongs to the
best-scoring detection covering it, so a cell has the same pixels, and the same number (1 =
best score), in every output. Geometry and measurements are scikit-image's (``find_contours``,
``regionprops_table``). This runs on the host after prediction, once per image, or once per
window of an image streamed in windows (``streaming.py``, ``painted_window``).
"""
from __future__ import annotations

import csv
import os
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import tifffile
from scipy import ndimage
from skimage import measure

from coco import cell_evidence, paint, paint_packed, scored_cells
from dataloader import CLASS_FILES, IMAGE_FILE, TIFF_SUFFIXES, UnlabelledImages, read_raw_image, sample_name
from errors import UsageError
from files import JsonArrayWriter, hidden, hidden_folder, publish_folder
from progress import progress

# Measured per cell (regionprops_table names); the CSV's columns (a grey image fills one intensity).
PROPERTIES = ("area", "perimeter", "centroid", "bbox", "eccentricity", "intensity_mean")
COLUMNS = ("image", "image_id", "cell", "class", "score", "area", "perimeter", "centroid_x", "centroid_y", "bbox_x0",
           "bbox_y0", "bbox_x1", "bbox_y1", "eccentricity", "mean_intensity_0", "mean_intensity_1", "mean_intensity_2")
CLASS_COLOURS = ((0, 255, 127), (255, 215, 0), (0, 191, 255), (255, 69, 0))  # visualization.py's, as RGB


@dataclass
class PaintedImage:
    """One image's cells: ``cells`` the detections left with pixels, best first, and ``labels``
    the canvas numbering them 1..N (0: background)."""

    name: str  # the image's file name
    image_id: int
    source: Path
    pixels: np.ndarray  # [H, W, C] as stored
    cells: list[dict]
    labels: np.ndarray  # int32 [H, W]
    origin: tuple[int, int] = (0, 0)  # (y, x) of pixels[0, 0] in the image: a window of a streamed image
    first: int = 1  # the number of cell 1 in the image (a streamed image's windows number on)


def painted_images(results: list[dict], test_dir: Path, entries: Sequence[dict],
                   score_thresh: float, evidence: bool) -> Iterator[PaintedImage]:
    """Each image of ``entries`` (id map entries of ``test_dir``) with its detections scoring
    at least ``score_thresh`` painted; with ``evidence``, its cells whose class evidence does
    (``coco.scored_cells``)."""
    by_image: dict[int, list[dict]] = {}
    for r in results:
        by_image.setdefault(int(r["image_id"]), []).append(r)
    for entry in progress(entries, "cell outputs"):
        source = Path(test_dir) / entry["file_name"]
        pixels = read_raw_image(source)
        dets = by_image.get(int(entry["id"]), [])
        if evidence:
            dets = scored_cells(dets, *pixels.shape[:2], score_thresh)
        kept, canvas = paint(dets, *pixels.shape[:2], score_thresh)
        yield PaintedImage(entry["file_name"], int(entry["id"]), source, pixels, *_numbered(kept, canvas))


def painted_window(name: str, image_id: int, source: Path, pixels: np.ndarray, origin: tuple[int, int], dets: dict,
                   core: np.ndarray, score_thresh: float, first: int, evidence: bool,
                   floor: float = 0.0) -> PaintedImage:
    """One window of a streamed image (``streaming.Part``: host tensors, window coordinates)
    painted like a whole image: all its detections scoring at least ``score_thresh`` (with
    ``evidence``: its cells whose class evidence does) compete for pixels, as they would in the
    whole image, then only the ``core`` ones (bool per detection) are kept, numbered on from
    ``first``. Detections under ``floor`` (the submission's --score_thresh) do not exist here."""
    scores = np.round(np.asarray(dets["scores"], dtype=np.float64), 5)  # as the submission holds them
    labels = np.asarray(dets["labels"])
    core = np.asarray(core)
    if evidence:
        order, canvas, sums = cell_evidence(dets["masks"], labels, scores, pixels.shape[:2], floor)
        best_first = np.argsort(-sums[1:], kind="stable")  # numbered by the evidence they are kept by
        renumber = np.zeros(len(order) + 1, dtype=np.int32)  # as ``paint`` orders the whole image's cells
        renumber[best_first + 1] = np.arange(1, len(order) + 1)
        canvas = renumber[canvas]
        order, sums = order[best_first], sums[1:][best_first]
        kept = [{"category_id": int(labels[i]), "score": round(float(t), 5)} for i, t in zip(order, sums)]
        inner = core[order] & (sums >= score_thresh)  # a cell is where its best detection is
    else:
        order = np.argsort(-scores, kind="stable")
        order = order[scores[order] >= max(score_thresh, floor)]
        canvas = paint_packed(dets["masks"], order, pixels.shape[:2])
        kept = [{"category_id": int(labels[i]), "score": float(scores[i])} for i in order]
        inner = core[order]
    canvas[~np.concatenate([[False], inner])[canvas]] = 0  # the neighbours' cells (and those short of it) leave
    return PaintedImage(name, image_id, source, pixels, *_numbered(kept, canvas), origin=(int(origin[0]), int(origin[1])),
                        first=first)


def _numbered(kept: list[dict], canvas: np.ndarray) -> tuple[list[dict], np.ndarray]:
    """The detections left with pixels on ``canvas`` (1 + index into ``kept``), best first, and
    the canvas renumbered 1..N in that order."""
    shown = np.unique(canvas[canvas > 0]) - 1
    rank = np.zeros(len(kept) + 1, dtype=np.int32)
    rank[shown + 1] = np.arange(1, len(shown) + 1)
    return [kept[i] for i in shown], rank[canvas]


def check_sample_names(file_names: Sequence[str]) -> None:
    """Label folders and GeoJSON files are named by each image's sample (``x`` for ``x.tif``):
    two images of one name (``x.tif`` and ``x.png``) would write over each other, so the
    folder is refused before prediction, naming both."""
    seen: dict[str, str] = {}
    for name in file_names:  # a.tif and A.png share a folder on macOS and Windows
        first = seen.setdefault(sample_name(name).casefold(), name)
        if first != name:
            raise UsageError(f"{first} and {name} would write the same label folder and GeoJSON file "
                             f"({sample_name(name)}); rename one of them.")


def write_label_sample(image: PaintedImage, folder: Path) -> None:
    """``folder/<sample>/``: the image and one label image per class (uint16, or uint32 for
    an image of more than 65,535 cells), written in a hidden folder renamed when complete:
    training and ``evaluate.py --labels`` read a missing class file as no cells of that class."""
    final = folder / sample_name(image.name)
    out = hidden_folder(final)
    if image.source.suffix.lower() in TIFF_SUFFIXES:
        shutil.copyfile(image.source, out / IMAGE_FILE)
    else:  # the training layout holds TIFFs: a PNG or JPEG is written as one, its pixels as stored
        tifffile.imwrite(out / IMAGE_FILE, image.pixels)
    classes = pixel_classes(image)
    for class_id, name in CLASS_FILES.items():
        dtype = np.uint16 if len(image.cells) <= np.iinfo(np.uint16).max else np.uint32
        tifffile.imwrite(out / name, np.where(classes == class_id, image.labels, 0).astype(dtype))
    publish_folder(out, final)


def pixel_classes(image: PaintedImage) -> np.ndarray:
    """The class of the cell at each pixel of ``image.labels`` (0: background)."""
    return np.array([0] + [c["category_id"] for c in image.cells], dtype=np.int64)[image.labels]


def features(image: PaintedImage, class_names: Sequence[str]) -> list[dict]:
    """Each cell a GeoJSON feature in image pixel coordinates (pixel corners: a one-pixel cell
    at (x, y) spans x..x+1), ``objectType`` detection, its class name and colour, its score as
    a measurement. Its geometry has every pixel the label images and the CSV give it
    (``cell_geometry``), so QuPath's areas match ``cells.csv`` but for the corners the traced
    rings cut (half a pixel each: a one-pixel cell measures 0.5)."""
    out = []
    for number, window in enumerate(ndimage.find_objects(image.labels), start=1):  # every number has pixels
        cell = image.cells[number - 1]
        # padding, then pixel centres, then the window's place in the image
        origin = (window[0].start - 1 + 0.5 + image.origin[0], window[1].start - 1 + 0.5 + image.origin[1])
        class_id = int(cell["category_id"])
        out.append({"type": "Feature", "id": f"{sample_name(image.name)}-{number + image.first - 1}",
                    "geometry": cell_geometry(np.pad(image.labels[window] == number, 1), origin),
                    "properties": {"objectType": "detection",
                                   "classification": {"name": class_names[class_id - 1],
                                                      "color": list(CLASS_COLOURS[(class_id - 1) % 4])},
                                   "measurements": {"score": float(cell["score"])}}})
    return out


_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity: a hole's pixels, as find_contours' "high" joins them


def cell_geometry(mask: np.ndarray, origin: tuple[float, float]) -> dict:
    """A cell's mask (padded by one pixel) as a GeoJSON Polygon, or a MultiPolygon when a better
    cell split it into pieces, each piece with its holes as interior rings: one outer ring
    alone would drop the other pieces and fill the holes. Pieces are 4-connected and holes
    8-connected, as ``find_contours`` traces them at 0.5, so each gives one closed ring.
    ``origin`` (y, x) places the mask's (0, 0) in the image."""
    pieces, count = ndimage.label(mask)
    polygons = []
    for k in range(1, count + 1):  # host-side output writing, a handful of pieces a cell
        piece = pieces == k
        filled = ndimage.binary_fill_holes(piece, structure=_EIGHT)  # 8-connected background from the border
        rings = [_ring(filled, origin, "low")]
        holes, n_holes = ndimage.label(filled & ~piece, structure=_EIGHT)
        rings += [_ring(holes == h, origin, "high") for h in range(1, n_holes + 1)]
        polygons.append(rings)
    if len(polygons) == 1:
        return {"type": "Polygon", "coordinates": polygons[0]}
    return {"type": "MultiPolygon", "coordinates": polygons}


def _ring(region: np.ndarray, origin: tuple[float, float], connected: str) -> list[list[float]]:
    """The closed boundary of one connected region, as [x, y] pairs in image coordinates."""
    trace = max(measure.find_contours(region.astype(np.uint8), 0.5, fully_connected=connected), key=len)
    ring = [[round(float(x) + origin[1], 2), round(float(y) + origin[0], 2)] for y, x in trace]
    if ring[0] != ring[-1]:
        ring.append(ring[0])
    return ring


def measurements(image: PaintedImage, class_names: Sequence[str]) -> list[dict]:
    """One row per cell: image, cell number, class, score and ``PROPERTIES`` (pixels; the mean
    intensity of each channel in the image's stored units)."""
    if not image.cells:
        return []
    table = measure.regionprops_table(image.labels, intensity_image=image.pixels, properties=("label", *PROPERTIES))
    channels = image.pixels.shape[2]
    oy, ox = image.origin
    rows = []
    for i, number in enumerate(table["label"]):
        cell = image.cells[number - 1]
        row = {"image": image.name, "image_id": image.image_id, "cell": int(number) + image.first - 1,
               "class": class_names[int(cell["category_id"]) - 1], "score": round(float(cell["score"]), 5),
               "area": int(table["area"][i]), "perimeter": round(float(table["perimeter"][i]), 3),
               "centroid_x": round(float(table["centroid-1"][i]) + ox, 3),
               "centroid_y": round(float(table["centroid-0"][i]) + oy, 3),
               "bbox_x0": int(table["bbox-1"][i]) + ox, "bbox_y0": int(table["bbox-0"][i]) + oy,
               "bbox_x1": int(table["bbox-3"][i]) + ox, "bbox_y1": int(table["bbox-2"][i]) + oy,
               "eccentricity": round(float(table["eccentricity"][i]), 4)}
        for c in range(channels):
            row[f"mean_intensity_{c}"] = round(float(table[f"intensity_mean-{c}"][i]), 3)
        rows.append(row)
    return rows


class CellWriter:
    """The requested per-cell outputs, written as images (or a streamed image's windows) come:
    a label folder per image, a GeoJSON file per image appended feature by feature and
    finished when the next image starts, one CSV for all; never more than one image's (or
    window's) cells in memory."""

    def __init__(self, class_names: Sequence[str], labels: Path | None = None, geojson_dir: Path | None = None,
                 csv_path: Path | None = None) -> None:
        self.class_names, self.labels, self.geojson_dir, self.csv_path = class_names, labels, geojson_dir, csv_path
        self._stack = ExitStack()
        self._table: csv.DictWriter | None = None
        self._current: str | None = None
        self._geojson: JsonArrayWriter | None = None  # the current image's
        self._canvases: dict[str, np.ndarray] = {}  # memory-mapped label TIFFs of a streamed image
        self._label_folder: Path | None = None  # where they go when the image is complete

    def __enter__(self) -> "CellWriter":
        if self.geojson_dir:
            self.geojson_dir.mkdir(parents=True, exist_ok=True)
        if self.csv_path:
            self.csv_path.parent.mkdir(parents=True, exist_ok=True)
            self._table = csv.DictWriter(self._stack.enter_context(open(hidden(self.csv_path), "w", newline="")),
                                         fieldnames=COLUMNS)
            self._table.writeheader()
        return self

    def __exit__(self, kind: type | None, *exc: object) -> None:
        """The CSV, like the submission, takes its name only when every image is in it; after a
        failure its rows so far stay in ``.<name>.tmp``."""
        try:
            self._finish_image(kind)
        finally:
            self._stack.close()
        if self.csv_path and kind is None:
            os.replace(hidden(self.csv_path), self.csv_path)

    def add(self, image: PaintedImage, size: tuple[int, int] | None = None) -> None:
        """Write ``image``'s cells; ``size``: the whole image's (H, W) when ``image`` is one
        window of it (``painted_window``), the windows of one image following each other."""
        if image.name != self._current:
            self._finish_image()
            self._current = image.name
            if self.labels and (self.labels / sample_name(image.name)).resolve() in image.source.resolve().parents:
                raise UsageError(f"{self.labels}: --save_labels would replace the folder of the image "
                                 f"{image.source} it labels; pass another folder.")
        if self.labels:
            if size is None:
                write_label_sample(image, self.labels)
            else:
                self._label_window(image, size)
        if self.geojson_dir:
            self._write_features(image)
        if self._table:
            self._table.writerows(measurements(image, self.class_names))

    def _write_features(self, image: PaintedImage) -> None:
        if self._geojson is None:
            self._geojson = JsonArrayWriter(self.geojson_dir / f"{sample_name(image.name)}.geojson",
                                            head='{"type":"FeatureCollection","features":[', tail="]}").__enter__()
        self._geojson.extend(features(image, self.class_names))

    def _label_window(self, image: PaintedImage, size: tuple[int, int]) -> None:
        """A streamed image's label folder: uint32 label TIFFs memory-mapped on disk, filled window
        by window with each window's own cells (``painted_window``; only where predictions of two
        windows disagree at their boundary could a later window's cell take a pixel)."""
        if not self._canvases:
            self._label_folder = self.labels / sample_name(image.name)
            out = hidden_folder(self._label_folder)
            if image.source.suffix.lower() in TIFF_SUFFIXES:
                shutil.copyfile(image.source, out / IMAGE_FILE)
            else:
                self._canvases[IMAGE_FILE] = tifffile.memmap(out / IMAGE_FILE, shape=(*size, image.pixels.shape[2]),
                                                             dtype=image.pixels.dtype)
            for name in CLASS_FILES.values():
                self._canvases[name] = tifffile.memmap(out / name, shape=size, dtype=np.uint32)
        (y0, x0), (h, w) = image.origin, image.labels.shape
        if IMAGE_FILE in self._canvases:
            self._canvases[IMAGE_FILE][y0:y0 + h, x0:x0 + w] = image.pixels
        classes = pixel_classes(image)
        for class_id, name in CLASS_FILES.items():
            mine = classes == class_id
            self._canvases[name][y0:y0 + h, x0:x0 + w][mine] = image.labels[mine] + image.first - 1

    def _finish_image(self, failure: type | None = None) -> None:
        if self._geojson is not None:  # after a failure the image's partial file keeps its hidden name
            self._geojson.__exit__(failure)
            self._geojson = None
        for canvas in self._canvases.values():
            canvas.flush()
        self._canvases = {}  # the maps closed before their folder is renamed
        if self._label_folder is not None and failure is None:
            publish_folder(hidden(self._label_folder), self._label_folder)
        self._label_folder = None


def write_cell_outputs(results: list[dict], dataset: UnlabelledImages, score_thresh: float,
                       class_names: Sequence[str], labels: Path | None = None, geojson_dir: Path | None = None,
                       csv_path: Path | None = None, *, evidence: bool) -> None:
    """Every requested output for every image of ``dataset`` (``CellWriter``)."""
    with CellWriter(class_names, labels, geojson_dir, csv_path) as writer:
        for image in painted_images(results, dataset.test_dir, dataset.entries, score_thresh, evidence=evidence):
            writer.add(image)
    report_cell_outputs(len(dataset.entries), score_thresh, labels, geojson_dir, csv_path)


def report_cell_outputs(images: int, score_thresh: float, *paths: Path | None) -> None:
    """The one line saying where the per-cell outputs went."""
    print(f"cells of {images} images (score >= {score_thresh:g}) -> {', '.join(str(p) for p in paths if p)}")
