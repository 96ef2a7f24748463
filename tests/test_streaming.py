"""Images larger than memory: lazy window reads, the window grid, and cells cut by window
edges kept exactly once, checked against a perfect predictor (``synthetic.oracle_window``)."""
from __future__ import annotations

import csv
import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import inference
from cell_outputs import CellWriter, PaintedImage, painted_window
from coco import detections_to_coco, paint
from conftest import random_checkpoint
from dataloader import CLASS_FILES, IMAGE_FILE, read_image, read_raw_image, sample_folders, to_float_rgb
from errors import UsageError
from files import JsonArrayWriter
from masks import PackedMasks
from streaming import CELL_MARGIN, LazyImage, stream_image, window_spans
from synthetic import cell_grid, id_image, oracle_window


@pytest.mark.parametrize("layout", ["plain", "lzw_strips", "zlib_tiles", "bigtiff", "channels_first", "grey16", "png"])
def test_a_lazy_window_equals_the_same_window_of_the_whole_image(tmp_path: Path, layout: str) -> None:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 255, (300, 410, 4), dtype=np.uint8)
    path = tmp_path / ("image.png" if layout == "png" else "image.tif")
    if layout == "png":
        Image.fromarray(rgba[..., :3]).save(path)
    elif layout == "channels_first":
        tifffile.imwrite(path, np.moveaxis(rgba[..., :3], 2, 0).copy(), photometric="rgb", planarconfig="separate",
                         compression="zlib")
    elif layout == "grey16":
        tifffile.imwrite(path, rgba[..., 0].astype(np.uint16) * 257, compression="zlib")
    else:
        options = {"plain": {}, "lzw_strips": {"compression": "lzw", "rowsperstrip": 16},
                   "zlib_tiles": {"compression": "zlib", "tile": (128, 128)},
                   "bigtiff": {"bigtiff": True, "compression": "zlib"}}[layout]
        tifffile.imwrite(path, rgba, photometric="rgb", extrasamples=["unassalpha"], **options)
    whole = read_raw_image(path)
    with LazyImage(path) as image:
        assert image.size == (300, 410)
        window = image.read(37, 150, 290, 401)
    assert window.dtype == whole.dtype and np.array_equal(window, whole[37:290, 150:401])


@pytest.mark.parametrize("length,window,tile", [(10000, 4096, 256), (4097, 4096, 256), (1000, 500, 32), (3000, 700, 0)])
def test_window_cores_partition_the_axis_and_keep_a_margin_from_inner_edges(length: int, window: int,
                                                                           tile: int) -> None:
    spans = window_spans(length, window, tile, 0.25)
    stride = int(tile * 0.75) or 1
    assert spans[0].start == 0 and spans[-1].stop == length and len(spans) > 1
    assert [s.core_start for s in spans[1:]] == [s.core_stop for s in spans[:-1]]  # no gap, no overlap
    assert spans[0].core_start == 0 and spans[-1].core_stop == length
    for s in spans:
        assert s.stop - s.start <= window and s.start % stride == 0  # on the whole image's tile grid
        if s.start > 0:
            assert s.core_start - s.start >= tile + CELL_MARGIN
        if s.stop < length:
            assert s.stop - s.core_stop >= tile + CELL_MARGIN
    assert window_spans(300, 4096, 256, 0.25) == [(0, 300, 0, 300)]
    with pytest.raises(UsageError, match="--window 600 is too small"):
        window_spans(5000, 600, 256, 0.25)


def test_a_float_image_is_scaled_by_its_own_peak_in_every_window(tmp_path: Path) -> None:
    """A dark window of a float image is not brightened to its own maximum: all windows share the image's."""
    array = np.full((300, 400), 10.0, np.float32)
    array[:, 200:] = 200.0
    tifffile.imwrite(tmp_path / "float.tif", array, compression="zlib")
    with LazyImage(tmp_path / "float.tif") as image:
        assert image.peak() == 200.0
        dark = to_float_rgb(image.read(0, 0, 300, 200), image.path, image.peak())
    assert np.allclose(dark, 10.0 / 255.0)  # the whole image's scale (peak <= 255: 8-bit units)
    assert np.array_equal(dark, read_image(tmp_path / "float.tif")[:, :200])


def test_a_streamed_float_image_a_little_over_1_is_noted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    """Its peak, found in bands, says it is divided by 255, as ``read_image`` says of a whole one."""
    import dataloader
    monkeypatch.setattr(dataloader, "_DIM_NOTED", set())
    tifffile.imwrite(tmp_path / "over.tif", np.full((300, 400), 1.01, np.float32), compression="zlib")
    with LazyImage(tmp_path / "over.tif") as image:
        assert image.peak() == pytest.approx(1.01)
    assert "over.tif: float32 pixels peak at 1.01 of the 255 they are scaled by" in capsys.readouterr().out


def _masks_by_cell(results: list[dict]) -> list[tuple[int, float, str]]:
    """Each cell's class, score and full-image mask as its compressed RLE (equal strings, equal masks)."""
    return sorted((r["category_id"], r["score"], r["segmentation"]["counts"]) for r in results)


def test_streamed_cells_equal_the_whole_image_cells_and_every_output_agrees(tmp_path: Path) -> None:
    """Every cell, those cut by window edges too, comes out once with its whole mask, as from
    the whole image; the label images, GeoJSON and CSV written window by window agree."""
    label = cell_grid((700, 900), spacing=30, radius=(4, 11), seed=3)
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, id_image(label), photometric="rgb", compression="zlib", tile=(128, 128))
    expected = detections_to_coco(oracle_window(id_image(label)), 1)
    names = ["w", "x", "y", "z"]
    with LazyImage(path) as image, JsonArrayWriter(tmp_path / "sub.json") as submission, \
            CellWriter(names, tmp_path / "lab", tmp_path / "geo", tmp_path / "cells.csv") as writer:
        numbered, windows = 0, 0
        for part in stream_image(image, oracle_window, window=400, tile=32, overlap=0.25):
            submission.extend(detections_to_coco(part.cells(image.size), 1))
            cells = painted_window("slide.tif", 1, path, part.pixels, part.origin, part.dets, part.core.numpy(), 0.0,
                                   numbered + 1, False)
            writer.add(cells, image.size)
            numbered += len(cells.cells)
            windows += 1
    assert windows > 4
    streamed = json.loads((tmp_path / "sub.json").read_text())
    assert len(streamed) == len(expected) == label.max()
    want, got = _masks_by_cell(expected), _masks_by_cell(streamed)
    assert want == got

    classes = {c: tifffile.imread(tmp_path / "lab" / "slide" / name) for c, name in CLASS_FILES.items()}
    assert all(a.shape == label.shape for a in classes.values())
    painted = sum(classes.values())
    pairs = {(int(a), int(b)) for a, b in zip(label[label > 0], painted[label > 0])}
    assert (painted > 0).sum() == (label > 0).sum() and len(pairs) == label.max()  # one number per cell
    assert len({b for _, b in pairs}) == label.max()
    rows = list(csv.DictReader(open(tmp_path / "cells.csv")))
    assert sorted(int(r["cell"]) for r in rows) == list(range(1, label.max() + 1))
    areas = np.bincount(painted.ravel(), minlength=label.max() + 1)
    assert all(int(r["area"]) == areas[int(r["cell"])] for r in rows)  # measured on the painted pixels
    for r in rows[:50]:
        mine = painted == int(r["cell"])
        ys, xs = mine.nonzero()
        assert (int(r["bbox_x0"]), int(r["bbox_y0"])) == (xs.min(), ys.min())  # image coordinates, not the window's
        assert float(r["centroid_x"]) == pytest.approx(xs.mean(), abs=1e-3)
    collection = json.loads((tmp_path / "geo" / "slide.geojson").read_text())
    assert len(collection["features"]) == label.max()
    assert len({f["id"] for f in collection["features"]}) == label.max()
    for feature in collection["features"]:
        geometry = feature["geometry"]
        polygons = geometry["coordinates"] if geometry["type"] == "MultiPolygon" else [geometry["coordinates"]]
        for ring in (np.array(r) for polygon in polygons for r in polygon):
            assert np.array_equal(ring[0], ring[-1]) and ring[:, 0].min() >= 0 and ring[:, 0].max() <= 900
            assert ring[:, 1].min() >= 0 and ring[:, 1].max() <= 700
        assert feature["properties"]["classification"]["name"] in names


# Overlapping cells (x0, y0, x1, y1, class, score): pairs straddle the core boundaries of 400 px
# windows with 32 px tiles (x = 236, y = 236), a worse and a better cell each side of it.
OVERLAPPING = [(220, 100, 250, 130, 1, 0.6), (240, 95, 270, 135, 2, 0.9), (100, 225, 140, 245, 3, 0.8),
               (110, 238, 150, 260, 4, 0.7), (20, 20, 50, 50, 1, 0.5)]


def _where_image(size: tuple[int, int]) -> np.ndarray:
    """Pixels that say where they are: y in the low 12 bits, x in the next 12 (R, G, B bytes)."""
    code = np.arange(size[0])[:, None] | (np.arange(size[1])[None, :] << 12)
    return np.stack([(code >> s) & 255 for s in (0, 8, 16)], axis=2).astype(np.uint8)


def _overlapping_cells(pixels: np.ndarray) -> dict:
    """A predictor of ``OVERLAPPING`` for any window of a ``_where_image``: each cell clipped to the window."""
    code = int(pixels[0, 0, 0]) | int(pixels[0, 0, 1]) << 8 | int(pixels[0, 0, 2]) << 16
    y0, x0 = code & 4095, code >> 12
    height, width = pixels.shape[:2]
    found = [(max(a - x0, 0), max(b - y0, 0), min(c - x0, width), min(d - y0, height), k, p)
             for a, b, c, d, k, p in OVERLAPPING]
    found = [f for f in found if f[2] > f[0] and f[3] > f[1]]
    boxes = np.array([f[:4] for f in found], dtype=np.int64).reshape(-1, 4)
    return {"boxes": torch.from_numpy(boxes).float(), "scores": torch.tensor([f[5] for f in found]),
            "labels": torch.tensor([f[4] for f in found]), "image_size": (height, width),
            "masks": PackedMasks.from_crops([np.ones((f[3] - f[1], f[2] - f[0]), bool) for f in found], boxes,
                                            (height, width))}


def test_cells_meeting_at_a_window_boundary_share_pixels_as_in_the_whole_image(tmp_path: Path) -> None:
    """Overlapping cells owned by different windows compete for their pixels in each window, so
    the streamed label images equal the whole image's: each pixel to the better cell, once."""
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, _where_image((500, 700)), photometric="rgb", compression="zlib")
    assert window_spans(700, 400, 32, 0.25)[1].core_start == 236 == window_spans(500, 400, 32, 0.25)[1].core_start
    with LazyImage(path) as image, CellWriter(list("abcd"), tmp_path / "lab") as writer:
        numbered = 0
        for part in stream_image(image, _overlapping_cells, window=400, tile=32, overlap=0.25):
            cells = painted_window("slide.tif", 1, path, part.pixels, part.origin, part.dets, part.core.numpy(), 0.0,
                                   numbered + 1, False)
            writer.add(cells, image.size)
            numbered += len(cells.cells)
    whole = detections_to_coco(_overlapping_cells(_where_image((500, 700))), 1)
    kept, canvas = paint(whole, 500, 700, 0.0)
    expected = np.array([0] + [r["category_id"] for r in kept])[canvas]
    streamed = {c: tifffile.imread(tmp_path / "lab" / "slide" / name) for c, name in CLASS_FILES.items()}
    assert numbered == len(OVERLAPPING) and ((sum(streamed.values()) > 0) == (canvas > 0)).all()
    for class_id, labels in streamed.items():
        assert np.array_equal(labels > 0, expected == class_id), class_id
    assert (sum((labels > 0).astype(int) for labels in streamed.values()) <= 1).all()  # a pixel in one file


def test_inference_streams_an_image_larger_than_the_window(tmp_path: Path, shallow: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """--window: a large image is predicted in windows and every output is written (here under
    --label_rule evidence, the default, which both paths are told); a window too small for the tiles stops before
    any prediction with the flag named."""
    told = []
    for name in ("painted_window", "painted_images"):
        real = getattr(inference, name)
        def told_evidence(*a: Any, real: Any = real, name: str = name, **k: Any) -> Any:
            told.append((name, inspect.signature(real).bind(*a, **k).arguments.get("evidence")))
            return real(*a, **k)
        monkeypatch.setattr(inference, name, told_evidence)
    folder = tmp_path / "slides"
    folder.mkdir()
    rng = np.random.default_rng(0)
    tifffile.imwrite(folder / "big.tif", rng.integers(0, 255, (300, 340, 3), dtype=np.uint8), compression="zlib",
                     tile=(64, 64))
    Image.fromarray(rng.integers(0, 255, (60, 70, 3), dtype=np.uint8)).save(folder / "small.png")
    common = ["--checkpoint", str(random_checkpoint(tmp_path / "best.pth")), "--test_dir", str(folder), "--num_workers", "0"]
    submission = inference.main([*common, "--output", str(tmp_path / "out" / "sub.json"), "--window", "300",
                                 "--save_geojson", str(tmp_path / "geo"), "--save_csv", str(tmp_path / "cells.csv"),
                                 "--save_labels", str(tmp_path / "lab"), "--label_thresh", "0"])
    assert {name for name, _ in told} == {"painted_window", "painted_images"}  # the big image's windows, the small one
    assert all(evidence is True for _, evidence in told)
    results = json.loads(Path(submission).read_text())
    assert {r["image_id"] for r in results} <= {1, 2} and any(r["image_id"] == 1 for r in results)
    big = [r for r in results if r["image_id"] == 1]
    assert all(r["segmentation"]["size"] == [300, 340] for r in big)
    assert len(big) > 20  # windows together keep more than one whole image's cap of 20
    assert sorted(p.name for p in (tmp_path / "geo").iterdir()) == ["big.geojson", "small.geojson"]
    assert tifffile.imread(tmp_path / "lab" / "big" / "class1.tif").shape == (300, 340)
    rows = list(csv.DictReader(open(tmp_path / "cells.csv")))
    assert {r["image"] for r in rows} <= {"big.tif", "small.png"}
    floor = inference.main([*common, "--output", str(tmp_path / "out" / "floor.json"), "--window", "300",
                            "--box_score_thresh", "0.6"])
    kept = json.loads(Path(floor).read_text())
    assert all(r["score"] >= 0.6 for r in kept) and len(kept) < len(results)  # dropped inside the model
    with pytest.raises(UsageError, match="--window 100 is too small"):
        inference.main([*common, "--output", str(tmp_path / "out" / "sub2.json"), "--window", "100"])


def test_cell_outputs_appear_only_complete_and_a_crash_leaves_hidden_parts(tmp_path: Path) -> None:
    """The CSV and each label folder (whole or streamed) take their names when complete; after a
    failure the parts keep hidden names, which no tool reads as a sample, and the rerun replaces them."""
    path = tmp_path / "a.png"
    pixels = np.full((40, 50, 3), 128, np.uint8)
    Image.fromarray(pixels).save(path)
    labels = np.zeros((40, 50), np.int32)
    labels[5:15, 5:15], labels[20:30, 30:45] = 1, 2
    cells = [{"category_id": 4, "score": 0.9}, {"category_id": 2, "score": 0.5}]
    whole = PaintedImage("a.png", 1, path, pixels, cells, labels)
    window = PaintedImage("b.png", 2, path, pixels, cells, labels)
    outputs = (tmp_path / "lab", None, tmp_path / "cells.csv")
    with pytest.raises(KeyboardInterrupt):
        with CellWriter(list("wxyz"), *outputs) as writer:
            writer.add(whole)
            writer.add(window, (40, 50))  # one window of a streamed image, cut short
            raise KeyboardInterrupt
    assert not (tmp_path / "cells.csv").exists() and (tmp_path / ".cells.csv.tmp").exists()
    assert sorted(p.name for p in (tmp_path / "lab").iterdir()) == [".b.tmp", "a"]
    assert [p.name for p in sample_folders(tmp_path / "lab")] == ["a"]
    with CellWriter(list("wxyz"), *outputs) as writer:
        writer.add(whole)
        writer.add(window, (40, 50))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in (tmp_path / "lab").iterdir()) == ["a", "b"]
    for sample in ("a", "b"):
        assert tifffile.imread(tmp_path / "lab" / sample / CLASS_FILES[4]).max() == 1
        assert tifffile.imread(tmp_path / "lab" / sample / CLASS_FILES[2]).max() == 2
    assert [r["image"] for r in csv.DictReader(open(tmp_path / "cells.csv"))] == ["a.png"] * 2 + ["b.png"] * 2
    (tmp_path / "lab" / "a" / "notes.txt").write_text("x")  # a rerun replaces the whole folder
    with CellWriter(list("wxyz"), tmp_path / "lab") as writer:
        writer.add(whole)
    assert sorted(p.name for p in (tmp_path / "lab").iterdir()) == ["a", "b"]
    assert not (tmp_path / "lab" / "a" / "notes.txt").exists()
    source = tmp_path / "data" / "s" / IMAGE_FILE  # a folder in the training layout, labelled into itself
    source.parent.mkdir(parents=True)
    tifffile.imwrite(source, pixels)
    with pytest.raises(UsageError, match="data: --save_labels would replace the folder of the image .*image.tif"):
        with CellWriter(list("wxyz"), tmp_path / "data") as writer:
            writer.add(PaintedImage("s.tif", 1, source, pixels, cells, labels))
    assert source.exists()
