"""Per-cell outputs for the tools biologists use, beside the COCO submission: label images in
the training layout (to correct and train on, or open in napari), a QuPath GeoJSON per image
and one measurement table (CSV) for all images.

All three come from one painted canvas per image (``coco.paint``): each pixel belongs to the
best-scoring detection covering it, so a cell has the same pixels, and the same number (1 =
best score), in every output. Geometry and measurements are scikit-image's (``find_contours``,
``regionprops_table``). This runs once per image after prediction, on the host.
"""
from __future__ import annotations

import csv
import json
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import tifffile
from scipy import ndimage
from skimage import measure
from tqdm import tqdm

from coco import paint
from dataloader import CLASS_FILES, IMAGE_FILE, TIFF_SUFFIXES, UnlabelledImages, read_raw_image

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


def painted_images(results: list[dict], dataset: UnlabelledImages, score_thresh: float) -> Iterator[PaintedImage]:
    """Each image of ``dataset`` with its detections scoring at least ``score_thresh`` painted."""
    by_image: dict[int, list[dict]] = {}
    for r in results:
        by_image.setdefault(int(r["image_id"]), []).append(r)
    for entry in tqdm(dataset.entries, desc="cell outputs", leave=False, disable=None):
        source = dataset.test_dir / entry["file_name"]
        pixels = read_raw_image(source)
        kept, canvas = paint(by_image.get(int(entry["id"]), []), *pixels.shape[:2], score_thresh)
        shown = np.unique(canvas[canvas > 0]) - 1  # detections with pixels left, best first
        rank = np.zeros(len(kept) + 1, dtype=np.int32)
        rank[shown + 1] = np.arange(1, len(shown) + 1)
        yield PaintedImage(entry["file_name"], int(entry["id"]), source, pixels, [kept[i] for i in shown],
                           rank[canvas])


def write_label_sample(image: PaintedImage, folder: Path) -> None:
    """``folder/<image stem>/``: the image and one label image per class (uint16, or uint32 for
    an image of more than 65,535 cells)."""
    out = folder / Path(image.name).stem
    out.mkdir(parents=True, exist_ok=True)
    if image.source.suffix.lower() in TIFF_SUFFIXES:
        shutil.copyfile(image.source, out / IMAGE_FILE)
    else:  # the training layout holds TIFFs: a PNG or JPEG is written as one, its pixels as stored
        tifffile.imwrite(out / IMAGE_FILE, image.pixels)
    classes = np.array([0] + [c["category_id"] for c in image.cells], dtype=np.int64)
    for class_id, name in CLASS_FILES.items():
        dtype = np.uint16 if len(image.cells) <= np.iinfo(np.uint16).max else np.uint32
        tifffile.imwrite(out / name, np.where(classes[image.labels] == class_id, image.labels, 0).astype(dtype))


def geojson(image: PaintedImage, class_names: Sequence[str]) -> dict:
    """A QuPath-importable FeatureCollection: each cell a polygon in image pixel coordinates
    (pixel corners: a one-pixel cell at (x, y) spans x..x+1), ``objectType`` detection, its
    class name and colour, its score as a measurement."""
    features = []
    for number, window in enumerate(ndimage.find_objects(image.labels), start=1):  # every number has pixels
        cell = image.cells[number - 1]
        crop = np.pad(image.labels[window] == number, 1)
        ring = max(measure.find_contours(crop.astype(np.uint8), 0.5), key=len)  # the outer boundary
        y0, x0 = window[0].start - 1 + 0.5, window[1].start - 1 + 0.5  # padding, then pixel centres
        coordinates = [[round(float(x) + x0, 2), round(float(y) + y0, 2)] for y, x in ring]
        if coordinates[0] != coordinates[-1]:
            coordinates.append(coordinates[0])
        class_id = int(cell["category_id"])
        features.append({"type": "Feature", "id": f"{Path(image.name).stem}-{number}",
                         "geometry": {"type": "Polygon", "coordinates": [coordinates]},
                         "properties": {"objectType": "detection",
                                        "classification": {"name": class_names[class_id - 1],
                                                           "color": list(CLASS_COLOURS[(class_id - 1) % 4])},
                                        "measurements": {"score": float(cell["score"])}}})
    return {"type": "FeatureCollection", "features": features}


def measurements(image: PaintedImage, class_names: Sequence[str]) -> list[dict]:
    """One row per cell: image, cell number, class, score and ``PROPERTIES`` (pixels; the mean
    intensity of each channel in the image's stored units)."""
    if not image.cells:
        return []
    table = measure.regionprops_table(image.labels, intensity_image=image.pixels, properties=("label", *PROPERTIES))
    channels = image.pixels.shape[2]
    rows = []
    for i, number in enumerate(table["label"]):
        cell = image.cells[number - 1]
        row = {"image": image.name, "image_id": image.image_id, "cell": int(number),
               "class": class_names[int(cell["category_id"]) - 1], "score": round(float(cell["score"]), 5),
               "area": int(table["area"][i]), "perimeter": round(float(table["perimeter"][i]), 3),
               "centroid_x": round(float(table["centroid-1"][i]), 3), "centroid_y": round(float(table["centroid-0"][i]), 3),
               "bbox_x0": int(table["bbox-1"][i]), "bbox_y0": int(table["bbox-0"][i]),
               "bbox_x1": int(table["bbox-3"][i]), "bbox_y1": int(table["bbox-2"][i]),
               "eccentricity": round(float(table["eccentricity"][i]), 4)}
        for c in range(channels):
            row[f"mean_intensity_{c}"] = round(float(table[f"intensity_mean-{c}"][i]), 3)
        rows.append(row)
    return rows


def write_cell_outputs(results: list[dict], dataset: UnlabelledImages, score_thresh: float,
                       class_names: Sequence[str], labels: Path | None = None, geojson_dir: Path | None = None,
                       csv_path: Path | None = None) -> None:
    """Every requested output for every image of ``dataset``, image by image: a label folder
    and a GeoJSON file per image as it is done, the CSV's rows appended (never all in memory)."""
    if geojson_dir:
        geojson_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        table = None
        if csv_path:
            csv_path.parent.mkdir(parents=True, exist_ok=True)
            table = csv.DictWriter(stack.enter_context(open(csv_path, "w", newline="")), fieldnames=COLUMNS)
            table.writeheader()
        for image in painted_images(results, dataset, score_thresh):
            if labels:
                write_label_sample(image, labels)
            if geojson_dir:
                (geojson_dir / f"{Path(image.name).stem}.geojson").write_text(json.dumps(geojson(image, class_names)))
            if table:
                table.writerows(measurements(image, class_names))
    written = [str(p) for p in (labels, geojson_dir, csv_path) if p]
    print(f"cells of {len(dataset.entries)} images (score >= {score_thresh:g}) -> {', '.join(written)}")
