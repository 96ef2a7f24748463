"""A user's own images: any folder of TIFF, PNG or JPEG files, with or without an id map."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import evaluate
import inference
from checkpoint import save_checkpoint
from dataloader import (ID_MAP_FILE, IMAGE_FILE, DatasetError, UnlabelledImages, find_id_map, image_size, list_samples,
                        number_images, read_image)
from model import build_model
from shallow import shallow_resnet
from synthetic import make_dataset

TINY = {"backbone": "resnet101", "weights": "none", "min_size": 64, "max_size": 128, "input_scale": 0.0,
        "detections_per_img": 20, "rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_test": 100}


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
    assert find_id_map(folder, "given.json") == Path("given.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty: no image"):
        number_images(tmp_path / "empty")


def test_inference_on_a_png_folder_writes_the_ids_it_used(tmp_path: Path, shallow: None) -> None:
    """PNG copies of labelled images, no id map: the submission numbers them by name, writes
    that map beside itself, evaluate.py scores it with that map, and --save_labels writes the
    training layout (TIFF) from PNG inputs."""
    data = make_dataset(tmp_path / "data", n_train=2, n_test=0, size=(64, 72), cells=(3, 5), seed=1)
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for sample in list_samples(data["train_dir"]):
        Image.fromarray(tifffile.imread(sample / IMAGE_FILE)).save(pngs / f"{sample.name}.png")
    torch.manual_seed(0)
    with shallow_resnet():
        model = build_model(TINY, load_weights=False)
    save_checkpoint(tmp_path / "best.pth", {"model": model.state_dict(), "config": TINY, "args": {}})
    out = tmp_path / "out"
    submission = inference.main(["--checkpoint", str(tmp_path / "best.pth"), "--test_dir", str(pngs),
                                 "--output_dir", str(out), "--num_workers", "0", "--save_labels", str(tmp_path / "lab"),
                                 "--label_thresh", "0"])
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
