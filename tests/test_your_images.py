"""A user's own images: any folder of TIFF, PNG or JPEG files, with or without an id map."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import evaluate
import inference
import training
from cell_outputs import write_cell_outputs
from checkpoint import CheckpointError
from conftest import random_checkpoint
from dataloader import (ID_MAP_FILE, IMAGE_FILE, DatasetError, UnlabelledImages, find_id_map, image_size, list_samples,
                        number_images, read_image)
from errors import UsageError
from synthetic import make_dataset


def test_png_jpeg_and_tiff_decode_to_the_same_pixels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", rgb)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(np.dstack([rgb, np.full((20, 30), 255, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).quantize(16).save(tmp_path / "palette.png")
    smooth = np.repeat(np.linspace(0, 255, 30, dtype=np.uint8)[None, :, None], 20, 0).repeat(3, 2)
    Image.fromarray(smooth).save(tmp_path / "smooth.jpg", quality=95)
    grey16 = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    expected = rgb.astype(np.float32) / 255
    assert np.array_equal(read_image(tmp_path / "a.png"), read_image(tmp_path / "a.tif"))
    assert np.allclose(read_image(tmp_path / "a.png"), expected)
    assert np.array_equal(read_image(tmp_path / "rgba.png"), read_image(tmp_path / "a.png"))  # alpha dropped
    palette = read_image(tmp_path / "palette.png")
    assert palette.shape == (20, 30, 3) and palette.dtype == np.float32
    assert np.abs(read_image(tmp_path / "smooth.jpg") - smooth / 255).mean() < 0.01  # lossy, close
    grey = read_image(tmp_path / "grey16.png")
    assert grey.shape == (20, 30, 3) and np.allclose(grey[..., 0], grey16 / 65535) and np.array_equal(grey[..., 0],
                                                                                                     grey[..., 2])
    for name in ("a.tif", "a.png", "smooth.jpg", "grey16.png"):
        assert image_size(tmp_path / name) == (20, 30)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DatasetError, match="broken.png"):
        read_image(tmp_path / "broken.png")


def test_a_16_bit_colour_png_keeps_its_16_bits(tmp_path: Path) -> None:
    """Pillow decodes 16-bit RGB, RGBA and grey+alpha PNGs to 8 bits, which made a 12-bit
    camera's image near black; they read as the same pixels as the 16-bit TIFF."""
    import imagecodecs
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 4096, (12, 14, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb)
    (tmp_path / "rgb16.png").write_bytes(imagecodecs.png_encode(rgb))
    rgba = np.dstack([rgb, np.full((12, 14), 65535, np.uint16)])
    (tmp_path / "rgba16.png").write_bytes(imagecodecs.png_encode(rgba))
    (tmp_path / "la16.png").write_bytes(imagecodecs.png_encode(np.ascontiguousarray(rgba[..., 2:])))
    expected = read_image(tmp_path / "rgb16.tif")
    assert expected.max() == pytest.approx(rgb.max() / 65535)
    assert np.array_equal(read_image(tmp_path / "rgb16.png"), expected)
    assert np.array_equal(read_image(tmp_path / "rgba16.png"), expected)
    grey = read_image(tmp_path / "la16.png")
    assert np.allclose(grey[..., 0], rgb[..., 2] / 65535) and np.array_equal(grey[..., 0], grey[..., 1])


def test_a_png_over_pillow_s_pixel_guard_is_sent_to_tiff(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "slide.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses twice this: 400 px
    for read in (image_size, read_image):
        with pytest.raises(DatasetError, match="slide.png: more pixels than Pillow opens .*save it as a TIFF"):
            read(tmp_path / "slide.png")


def test_two_images_of_one_name_are_refused_before_prediction_when_outputs_are_named_by_it(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "X.png")  # one folder on macOS and Windows
    tifffile.imwrite(folder / "x.tif", np.zeros((8, 8, 3), np.uint8))
    argv = ["--checkpoint", str(tmp_path / "never_read.pth"), "--test_dir", str(folder), "--output_dir", str(tmp_path)]
    with pytest.raises(UsageError, match="X.png and x.tif would write the same label folder and GeoJSON file"):
        inference.main([*argv, "--save_geojson", str(tmp_path / "cells")])
    with pytest.raises(CheckpointError):  # the submission and CSV name images in full: the checkpoint is next
        inference.main([*argv, "--save_csv", str(tmp_path / "cells.csv")])


def test_a_folder_without_id_map_is_numbered_by_file_name(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, size in (("b.png", (8, 9)), ("a.jpg", (10, 11)), ("c.tif", (12, 13))):
        array = np.zeros((*size, 3), np.uint8)
        tifffile.imwrite(folder / name, array) if name.endswith(".tif") else Image.fromarray(array).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    entries = number_images(folder)
    assert entries == [{"file_name": "a.jpg", "id": 1, "height": 10, "width": 11},
                       {"file_name": "b.png", "id": 2, "height": 8, "width": 9},
                       {"file_name": "c.tif", "id": 3, "height": 12, "width": 13}]
    assert len(UnlabelledImages(folder, None)) == 3
    assert find_id_map(folder, None) is None
    (tmp_path / ID_MAP_FILE).write_text(json.dumps(entries))
    assert find_id_map(folder, None) == tmp_path / ID_MAP_FILE  # the task's layout: the map beside the folder
    (tmp_path / "other").mkdir()
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "other" / "x.png")
    assert find_id_map(tmp_path / "other", None) is None  # a map of another folder beside it is not this one's
    assert find_id_map(folder, "given.json") == Path("given.json")
    (folder / "._a.jpg").write_bytes(b"\0\5\26\7")  # macOS's resource fork: hidden, not an image
    assert find_id_map(folder, None) == tmp_path / ID_MAP_FILE
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(folder / "d.png")  # one image more than the map names
    with pytest.raises(DatasetError, match=r"mine: 1 test file\(s\) have no id in .*: d.png"):
        find_id_map(folder, None)  # refused, not numbered 1..N under ids that differ from the map's
    with pytest.raises(DatasetError, match=r"found beside the folder and is used by default: pass --id_map_json"):
        training.main(["--train_dir", "never_read", "--test_dir", str(folder)], "resnet101", "")  # before training
    (folder / "d.png").unlink()
    (tmp_path / ID_MAP_FILE).write_text("[{")
    with pytest.raises(DatasetError, match="not valid JSON"):
        find_id_map(folder, None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty: no image"):
        number_images(tmp_path / "empty")


def test_the_numbered_map_never_overwrites_another_map(tmp_path: Path) -> None:
    """The task's map in the output folder is refused before the checkpoint is read (this one does
    not exist); the same numbering, as a rerun writes it, is not."""
    data = make_dataset(tmp_path / "data", n_train=0, n_test=2, size=(32, 40), cells=(1, 2), seed=3)
    mine = tmp_path / "mine"
    shutil.copytree(data["test_dir"], mine)
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(data["id_map_json"], out / ID_MAP_FILE)
    task_map = (out / ID_MAP_FILE).read_text()
    argv = ["--checkpoint", str(tmp_path / "none.pth"), "--test_dir", str(mine), "--output_dir", str(out)]
    with pytest.raises(UsageError, match=f"{out / ID_MAP_FILE}: an id map of other images is there"):
        inference.main(argv)
    assert (out / ID_MAP_FILE).read_text() == task_map
    (out / ID_MAP_FILE).write_text(json.dumps(number_images(mine)))  # an earlier run's numbering
    with pytest.raises(CheckpointError, match="none.pth: checkpoint not found"):
        inference.main(argv)


def test_inference_on_a_png_folder_writes_the_ids_it_used(tmp_path: Path, shallow: None) -> None:
    """PNG copies of labelled images, no id map: the submission numbers them by name, writes
    that map beside itself, evaluate.py scores it with that map, and --save_labels writes the
    training layout (TIFF) from PNG inputs."""
    data = make_dataset(tmp_path / "data", n_train=2, n_test=0, size=(64, 72), cells=(3, 5), seed=1)
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for sample in list_samples(data["train_dir"]):
        Image.fromarray(tifffile.imread(sample / IMAGE_FILE)).save(pngs / f"{sample.name}.png")
    out = tmp_path / "out"
    submission = _predict_with_labels(pngs, tmp_path, "--save_geojson", str(tmp_path / "geo"),
                                      "--save_csv", str(tmp_path / "cells.csv"), "--class_names", "a", "b", "c", "d")
    written = json.loads((out / ID_MAP_FILE).read_text())
    assert [e["file_name"] for e in written] == sorted(p.name for p in pngs.iterdir())
    assert [e["id"] for e in written] == [1, 2]
    results = json.loads(Path(submission).read_text())
    assert results and {r["image_id"] for r in results} <= {1, 2}
    metrics = evaluate.main(["--data_dir", str(data["train_dir"]), "--submission", str(submission),
                             "--id_map_json", str(out / ID_MAP_FILE)])
    assert 0.0 <= metrics["segm_AP50"] <= 1.0
    relabelled = sorted((tmp_path / "lab").iterdir())
    assert [p.name for p in relabelled] == [Path(e["file_name"]).stem for e in written]
    assert tifffile.imread(relabelled[0] / IMAGE_FILE).shape == (64, 72, 3)  # a TIFF, as the layout holds
    assert sorted(p.stem for p in (tmp_path / "geo").iterdir()) == [p.name for p in relabelled]
    rows = list(csv.DictReader(open(tmp_path / "cells.csv")))
    assert rows and {r["class"] for r in rows} <= {"a", "b", "c", "d"} and {r["image"] for r in rows} <= set(os_names(pngs))


def test_a_labelled_folder_predicts_as_it_is_and_scores_without_an_id_map(tmp_path: Path, shallow: None) -> None:
    """A held-out folder in the training layout (<sample>/image.tif): inference.py numbers its
    samples as evaluate.py does, so the submission scores with no id map, and the labels it
    writes are named by sample."""
    data = make_dataset(tmp_path / "data", n_train=3, n_test=0, size=(64, 72), cells=(3, 5), seed=2)
    val = data["train_dir"]
    first, second, _ = list_samples(val)
    first.rename(val / "a-1")  # 'a-1' sorts after 'a' as a sample, before 'a.tif' as a file
    second.rename(val / "a")
    out = tmp_path / "out"
    submission = _predict_with_labels(val, tmp_path)
    written = json.loads((out / ID_MAP_FILE).read_text())
    names = [p.name for p in list_samples(val)]
    assert names[:2] == ["a", "a-1"]
    assert [e["file_name"] for e in written] == [f"{n}/{IMAGE_FILE}" for n in names]
    assert [e["id"] for e in written] == [1, 2, 3]
    plain = evaluate.main(["--data_dir", str(val), "--submission", str(submission)])
    mapped = evaluate.main(["--data_dir", str(val), "--submission", str(submission), "--id_map_json",
                            str(out / ID_MAP_FILE)])
    assert json.dumps(plain, sort_keys=True) == json.dumps(mapped, sort_keys=True)  # NaN: a class with no cell
    assert {r["image_id"] for r in json.loads(Path(submission).read_text())} == {1, 2, 3}
    assert sorted(p.name for p in (tmp_path / "lab").iterdir()) == names
    assert evaluate.main(["--data_dir", str(val), "--labels", str(tmp_path / "lab")])["segm_AP50"] >= 0.0


def _predict_with_labels(folder: Path, tmp_path: Path, *extra: str) -> Path:
    """inference.py with a random-weight checkpoint on ``folder``: submission and id map in
    tmp_path/out, label images of every cell in tmp_path/lab."""
    return inference.main(["--checkpoint", str(random_checkpoint(tmp_path / "best.pth")), "--test_dir", str(folder), "--output_dir",
                           str(tmp_path / "out"), "--num_workers", "0", "--save_labels", str(tmp_path / "lab"),
                           "--label_thresh", "0", *extra])


def os_names(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir()]


def _square_results(height: int, width: int) -> list[dict]:
    """Two cells: class 1 (score 0.9) on rows 2-5, cols 3-7; class 3 (0.6) on rows 10-13, cols 10-12."""
    from pycocotools import mask as mask_util

    results = []
    for (y0, y1, x0, x1), label, score in (((2, 6, 3, 8), 1, 0.9), ((10, 14, 10, 13), 3, 0.6)):
        full = np.zeros((height, width), np.uint8, order="F")
        full[y0:y1, x0:x1] = 1
        rle = mask_util.encode(full)
        results.append({"image_id": 1, "category_id": label, "score": score, "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "segmentation": {"size": [height, width], "counts": rle["counts"].decode()}})
    return results


def test_geojson_and_csv_describe_each_cell(tmp_path: Path) -> None:
    """QuPath polygons span the cells' pixels in image coordinates; the table's areas,
    centroids, boxes and mean intensities are the pixels'; class names come from the caller."""
    folder = tmp_path / "images"
    folder.mkdir()
    image = np.zeros((20, 20, 3), np.uint8)
    image[2:6, 3:8] = (10, 20, 30)
    image[10:14, 10:13] = (200, 100, 50)
    Image.fromarray(image).save(folder / "slide.png")
    names = ["epithelial", "lymphocyte", "neutrophil", "macrophage"]
    write_cell_outputs(_square_results(20, 20), UnlabelledImages(folder, None), 0.5, names,
                       geojson_dir=tmp_path / "geo", csv_path=tmp_path / "cells.csv", evidence=False)
    collection = json.loads((tmp_path / "geo" / "slide.geojson").read_text())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 2
    for feature, (x0, y0, x1, y1), name, score in zip(collection["features"], ((3, 2, 8, 6), (10, 10, 13, 14)),
                                                      ("epithelial", "neutrophil"), (0.9, 0.6)):
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon" and ring[0] == ring[-1]
        ring = np.array(ring)
        assert (ring[:, 0].min(), ring[:, 1].min(), ring[:, 0].max(), ring[:, 1].max()) == (x0, y0, x1, y1)
        assert abs(_ring_area(ring) - (x1 - x0) * (y1 - y0)) <= 0.5  # the pixels, corners cut by half a pixel
        props = feature["properties"]
        assert props["objectType"] == "detection" and props["classification"]["name"] == name
        assert props["measurements"]["score"] == pytest.approx(score)
    rows = list(csv.DictReader(open(tmp_path / "cells.csv")))
    assert [(r["image"], r["cell"], r["class"]) for r in rows] == [("slide.png", "1", "epithelial"),
                                                                   ("slide.png", "2", "neutrophil")]
    assert [int(r["area"]) for r in rows] == [20, 12]
    assert (float(rows[0]["centroid_x"]), float(rows[0]["centroid_y"])) == (5.0, 3.5)
    assert [rows[1][f"bbox_{k}"] for k in ("x0", "y0", "x1", "y1")] == ["10", "10", "13", "14"]
    assert [float(rows[1][f"mean_intensity_{c}"]) for c in range(3)] == [200.0, 100.0, 50.0]


def _ring_area(ring: list) -> float:
    ring = np.array(ring)
    return 0.5 * abs(np.dot(ring[:-1, 0], ring[1:, 1]) - np.dot(ring[1:, 0], ring[:-1, 1]))


def test_a_cell_in_pieces_or_with_a_hole_keeps_every_pixel_in_geojson() -> None:
    """A cell split in two by a better cell becomes a MultiPolygon of both pieces, and a hole an
    interior ring, so QuPath's area matches the CSV's (one outer ring used to drop both)."""
    from cell_outputs import cell_geometry
    mask = np.zeros((20, 20), bool)
    mask[2:6, 2:6] = True  # a 4 x 4 piece
    mask[10:18, 10:18] = True  # an 8 x 8 piece with a 2 x 2 hole
    mask[13:15, 13:15] = False
    geometry = cell_geometry(np.pad(mask, 1), (-0.5, -0.5))
    assert geometry["type"] == "MultiPolygon" and [len(p) for p in geometry["coordinates"]] == [1, 2]
    small, (outer, hole) = geometry["coordinates"]
    assert all(ring[0] == ring[-1] for ring in (small[0], outer, hole))
    assert np.array(small[0]).min(0).tolist() == [2, 2] and np.array(small[0]).max(0).tolist() == [6, 6]
    assert np.array(hole).min(0).tolist() == [13, 13] and np.array(hole).max(0).tolist() == [15, 15]
    area = _ring_area(small[0]) + _ring_area(outer) - _ring_area(hole)
    assert abs(area - mask.sum()) <= 0.5 * 3 * 4  # each ring's corners cut by half a pixel
    whole = cell_geometry(np.pad(mask[:8, :8], 1), (-0.5, -0.5))
    assert whole["type"] == "Polygon" and len(whole["coordinates"]) == 1


def test_label_evidence_keeps_a_cell_whose_classes_share_its_score_streamed_or_not(tmp_path: Path) -> None:
    """A cell at 0.35 of one class and 0.3 of another is no cell at --label_thresh 0.5, but one
    under --label_rule evidence, of its best class, scored 0.65; a window that is the whole image
    paints the same cells as the whole image does."""
    import torch

    from cell_outputs import painted_images, painted_window
    from masks import PackedMasks

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / "slide.png")
    results = _square_results(20, 20)  # the 0.9 cell (class 1) and the 0.6 one (class 3)
    results[1]["score"] = 0.35
    results.append({**results[1], "category_id": 2, "score": 0.3})
    names = ["e", "l", "n", "m"]
    for evidence, kept in ((False, [("e", 0.9)]), (True, [("e", 0.9), ("n", 0.65)])):
        write_cell_outputs(results, UnlabelledImages(folder, None), 0.5, names, csv_path=tmp_path / "cells.csv",
                           evidence=evidence)
        rows = list(csv.DictReader(open(tmp_path / "cells.csv")))
        assert [(r["class"], pytest.approx(float(r["score"]))) for r in rows] == kept
    (whole,) = painted_images(results, folder, UnlabelledImages(folder, None).entries, 0.5, evidence=True)
    boxes = np.array([[3, 2, 8, 6], [10, 10, 13, 14], [10, 10, 13, 14]])
    dets = {"scores": torch.tensor([r["score"] for r in results]), "labels": torch.tensor([1, 3, 2]),
            "masks": PackedMasks.from_crops([np.ones((y1 - y0, x1 - x0), bool) for x0, y0, x1, y1 in boxes], boxes,
                                            (20, 20))}
    window = painted_window("slide.png", 1, folder / "slide.png", whole.pixels, (0, 0), dets, np.ones(3, bool), 0.5, 1,
                            evidence=True)
    assert [(c["category_id"], pytest.approx(c["score"])) for c in window.cells] == [(1, 0.9), (3, 0.65)]
    assert np.array_equal(window.labels, whole.labels)
    outside = painted_window("slide.png", 1, folder / "slide.png", whole.pixels, (0, 0), dets,
                             np.array([True, False, True]), 0.5, 1, evidence=True)
    assert len(outside.cells) == 1 and outside.labels.max() == 1  # its best detection is a neighbour's: it leaves
    floor = painted_window("slide.png", 1, folder / "slide.png", whole.pixels, (0, 0), dets, np.ones(3, bool), 0.5, 1,
                           evidence=True, floor=0.32)  # --score_thresh 0.32: the 0.3 detection was never submitted
    assert [(c["category_id"], c["score"]) for c in floor.cells] == [(1, 0.9)]


def test_a_note_names_the_caps_images_reached(capsys: pytest.CaptureFixture) -> None:
    """Cells past a cap are dropped silently by the model; the user is told, with the flag that keeps them."""
    results = [{"image_id": 1, "category_id": 1 + k % 2} for k in range(6)] + [{"image_id": 2, "category_id": 3}]
    inference.report_caps(results, cap=6, per_class=3)
    out = capsys.readouterr().out
    assert "1 image(s) reached --detections_per_img 6" in out and "1 image(s) reached --detections_per_class 3" in out
    inference.report_caps(results, cap=7, per_class=0)
    assert capsys.readouterr().out == ""


def test_label_rule_reaches_the_cell_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """inference.py keeps cells by their class evidence unless --label_rule score says otherwise."""
    import inference

    told = []
    monkeypatch.setattr(inference, "predict_folder", lambda *a, **k: told.append(k["cell_outputs"]) or tmp_path)
    (tmp_path / "best.pth").write_bytes(b"")
    common = ["--checkpoint", str(tmp_path / "best.pth"), "--test_dir", str(tmp_path), "--save_csv",
              str(tmp_path / "cells.csv")]
    inference.main(common)
    inference.main([*common, "--label_rule", "score"])
    assert [t.evidence for t in told] == [True, False]
    with pytest.raises(SystemExit):
        inference.main([*common, "--label_rule", "best"])


def test_class_names_are_one_per_class_of_the_model(tmp_path: Path, shallow: None) -> None:
    """--class_names names each class of the model: a 2-class model's defaults are two names, and a
    typed count that does not fit stops inference.py before any image is predicted, and training
    before any sample is read, in one line naming the flag."""
    from flags import class_names_for

    assert class_names_for(None, None, 3) == ["class1", "class2"]
    assert class_names_for(["a", "b"], ["w", "x", "y", "z"], 3) == ["a", "b"]  # typed names win over the run's
    assert class_names_for(None, ["w", "x", "y", "z"], 5) == ["w", "x", "y", "z"]
    # A run's own names are fitted to its classes: earlier runs had to give four, whatever their classes.
    assert class_names_for(None, ["w", "x", "y", "z"], 3) == ["w", "x"]
    assert class_names_for(None, ["w"], 3) == ["w", "class2"]
    data = make_dataset(tmp_path / "data", n_train=0, n_test=2, size=(32, 40), cells=(1, 2), seed=3)
    checkpoint = random_checkpoint(tmp_path / "model.pth")  # 4 classes and the background
    argv = ["--checkpoint", str(checkpoint), "--test_dir", str(data["test_dir"]), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(UsageError, match=r"^--class_names: 3 names \(a b c\) for a model of 4 classes"):
        inference.main([*argv, "--class_names", "a", "b", "c"])
    assert not (tmp_path / "out" / "test-results.json").exists()
    with pytest.raises(UsageError, match=r"^--class_names: 4 names \(a b c d\) for a model of 2 classes"):
        training.main(["--train_dir", "never_read", "--num_classes", "3", "--class_names", "a", "b", "c", "d",
                       "--output_dir", str(tmp_path / "run")], "resnet101", "")
