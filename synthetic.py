"""A seeded synthetic dataset in the training layout and the real file formats.

Used by ``--demo`` (a first run that needs no download) and by the tests: RGBA LZW
``image.tif``, float64 label images with non-contiguous ids, a test folder and an id map.
Cells of the four classes differ in colour and size, so a model can learn them quickly.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import tifffile
import torch
from scipy import ndimage

from dataloader import CLASS_FILES, IMAGE_FILE
from masks import PackedMasks

# Stain-like colour and radius range per class.
_CLASS_STYLE = {1: ((90, 40, 140), (5, 9)), 2: ((200, 80, 150), (4, 7)),
                3: ((40, 90, 200), (7, 11)), 4: ((140, 90, 30), (6, 10))}


def make_dataset(root: Path, n_train: int = 8, n_test: int = 3, size: tuple[int, int] = (160, 192),
                 cells: tuple[int, int] = (10, 25), seed: int = 0) -> dict[str, Path]:
    """Write ``root/train``, ``root/test_release`` and ``root/test_image_name_to_ids.json``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        image, labels = synth_image(rng, size, int(rng.integers(*cells)))
        sample = root / "train" / f"sample_{i:03d}"
        sample.mkdir(parents=True, exist_ok=True)
        write_rgba_lzw(sample / IMAGE_FILE, image)
        for class_id, label in labels.items():
            if label.any():
                tifffile.imwrite(sample / CLASS_FILES[class_id], label.astype(np.float64))
    test_dir = root / "test_release"
    test_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, image_id in enumerate(rng.permutation(n_test) + 1):
        image, _ = synth_image(rng, size, int(rng.integers(*cells)))
        name = f"test_{i:03d}.tif"
        write_rgba_lzw(test_dir / name, image)
        entries.append({"file_name": name, "id": int(image_id), "height": size[0], "width": size[1]})
    id_map = root / "test_image_name_to_ids.json"
    id_map.write_text(json.dumps(entries, indent=1))
    return {"train_dir": root / "train", "test_dir": test_dir, "id_map_json": id_map}


def synth_image(rng: np.random.Generator, size: tuple[int, int], n_cells: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """An RGB uint8 image and one label image per class (ids spaced out, not contiguous)."""
    height, width = size
    image = np.empty((height, width, 3), dtype=np.float32)
    image[:] = (235, 215, 225)
    image += rng.normal(0, 6, image.shape)
    labels = {c: np.zeros(size, dtype=np.int64) for c in CLASS_FILES}
    for k in range(n_cells):
        class_id = int(rng.choice([1, 2, 3, 4], p=[0.4, 0.4, 0.1, 0.1]))
        colour, (r_min, r_max) = _CLASS_STYLE[class_id]
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        ry, rx = rng.uniform(r_min, r_max, size=2)
        y0, y1 = max(cy - int(ry) - 1, 0), min(cy + int(ry) + 2, height)
        x0, x1 = max(cx - int(rx) - 1, 0), min(cx + int(rx) + 2, width)
        yy, xx = np.mgrid[y0:y1, x0:x1]  # only the cell's window: dense 1000x1000 images stay fast
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        labels[class_id][y0:y1, x0:x1][inside] = 3 * k + 7
        image[y0:y1, x0:x1][inside] = np.array(colour) + rng.normal(0, 8, (int(inside.sum()), 3))
    return image.clip(0, 255).astype(np.uint8), labels


def cell_grid(size: tuple[int, int], spacing: int, radius: tuple[int, int], seed: int = 0) -> np.ndarray:
    """An int64 label image of round cells, one per ``spacing`` square (jittered, radius in
    [radius[0], radius[1]]), ids 1..N in raster order: a whole slide's density (spacing 41 puts
    about 40,000 cells on 8192 x 8192) in a second."""
    rng = np.random.default_rng(seed)
    label = np.zeros(size, dtype=np.int64)
    disks = {r: np.hypot(*np.mgrid[-r:r + 1, -r:r + 1]) <= r for r in range(radius[0], radius[1] + 1)}
    slack = spacing - 2 * radius[1] - 2
    number = 0
    for y in range(0, size[0] - spacing + 1, spacing):
        for x in range(0, size[1] - spacing + 1, spacing):
            r = int(rng.integers(radius[0], radius[1] + 1))
            dy, dx = rng.integers(0, max(slack, 0) + 1, size=2) + 1 + radius[1] - r
            number += 1
            label[y + dy:y + dy + 2 * r + 1, x + dx:x + dx + 2 * r + 1][disks[r]] = number
    return label


def id_image(label: np.ndarray) -> np.ndarray:
    """A label image carried as RGB pixels (id = R + 256 G + 65536 B), so that a window read
    from an image file knows its cells: the input of ``oracle_window``."""
    return np.stack([(label >> shift) & 255 for shift in (0, 8, 16)], axis=2).astype(np.uint8)


def oracle_window(pixels: np.ndarray) -> dict:
    """The perfect predictor of an ``id_image`` window, in ``predictor.predict_images``' form:
    every cell seen, cut where the window cuts it, class ``id % 4 + 1``, a score fixed by its
    id. It stands in for a model where a test or benchmark needs known cells (``streaming.py``)."""
    ids = pixels.astype(np.int64) @ np.array([1, 256, 65536])
    found = [(k, s) for k, s in enumerate(ndimage.find_objects(ids), start=1) if s is not None]
    boxes = np.array([[s[1].start, s[0].start, s[1].stop, s[0].stop] for _, s in found], dtype=np.int64).reshape(-1, 4)
    numbers = torch.tensor([k for k, _ in found], dtype=torch.int64)
    masks = PackedMasks.from_crops([ids[s] == k for k, s in found], boxes, ids.shape)
    return {"boxes": torch.from_numpy(boxes).float(), "scores": 0.05 + 0.9 * (numbers * 7919 % 1000) / 1000.0,
            "labels": numbers % 4 + 1, "masks": masks, "image_size": ids.shape}


def write_rgba_lzw(path: Path, rgb: np.ndarray) -> None:
    """The task's image format: RGBA, LZW-compressed (needs imagecodecs)."""
    alpha = np.full(rgb.shape[:2] + (1,), 255, dtype=np.uint8)
    tifffile.imwrite(path, np.concatenate([rgb, alpha], axis=2), photometric="rgb",
                     compression="lzw", extrasamples=["unassalpha"])


def apply_demo_settings(args: argparse.Namespace, given: set[str]) -> None:
    """Point the run at fresh synthetic data and a CPU-sized budget, keeping the flags the
    user typed (``given``: their destinations)."""
    # Native scale: the default --input_scale 2 would make the CPU demo four times slower.
    demo = {"epochs": 3, "weights": "none", "min_size": 192, "max_size": 192, "warmup_epochs": 1,
            "input_scale": 0.0, "anchor_sizes": [8, 16, 32, 64, 128], "crop": 0,
            "detections_per_img": 100, "rpn_pre_nms_top_n_train": 1000, "rpn_post_nms_top_n_train": 500,
            "rpn_pre_nms_top_n_test": 1000, "rpn_post_nms_top_n_test": 500, "num_workers": 0,
            "output_dir": f"outputs/demo_{Path(args.output_dir).name}", "lr": 4e-4}
    for key, value in demo.items():
        if key not in given:
            setattr(args, key, value)
    paths = make_dataset(Path(args.output_dir) / "demo_data", seed=args.seed)
    for key, value in paths.items():
        setattr(args, key, str(value))
    print(f"demo: synthetic dataset written to {Path(args.output_dir) / 'demo_data'}")
