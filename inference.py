"""The command line from a checkpoint and a test folder to a submission: reads the images
and id map, predicts them (``predictor.py``) and writes the COCO results, and label images
on request. The model is rebuilt from the checkpoint's config, so no architecture flag is
needed:
    python inference.py --checkpoint outputs/resnet101/best.pth
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tifffile
from torch.utils.data import DataLoader
from tqdm import tqdm

from checkpoint import load_model
from cli import run_cli
from coco import paint
from dataloader import (CLASS_FILES, ID_MAP_FILE, IMAGE_FILE, TIFF_SUFFIXES, UnlabelledImages, collate_fn,
                        find_id_map, read_image, read_raw_image)
from devices import default_device
from files import writable_dir, write_json
from flags import HelpFormatter, add_checkpoint_checks, add_id_map_arg, add_prediction_args, prediction_settings
from model import scale_factor
from predictor import Settings, predict


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True, nargs="+",
                        help="best.pth or last.pth written by a train script; several: an ensemble, any backbones, "
                             "merged like TTA views")
    parser.add_argument("--test_dir", default="dataset/test_release",
                        help="folder of the images to predict: TIFF, PNG or JPEG; grey, RGB or RGBA; 8 or 16 bit")
    add_id_map_arg(parser)
    parser.add_argument("--output_dir", default=None,
                        help="folder of the submission, <output_dir>/test-results.json (default: the checkpoint's)")
    parser.add_argument("--output", default=None, help="exact submission path, instead of --output_dir")
    parser.add_argument("--num_workers", type=int, default=2, help="image-decoding worker processes")
    parser.add_argument("--score_thresh", type=float, default=0.0,
                        help="drop detections below this score (0 keeps all: AP rewards low-score hits)")
    parser.add_argument("--save_labels", default=None, metavar="DIR",
                        help="also write DIR/<image stem>/image.tif + class1.tif..class4.tif (uint16 ids, best score "
                             "first, overlaps to the better score): the training layout, to correct and train on")
    parser.add_argument("--label_thresh", type=float, default=0.5, help="--save_labels: lowest score drawn")
    add_prediction_args(parser)
    model = add_checkpoint_checks(parser)
    model.add_argument("--min_size", type=int, default=None, help="override the checkpoint's input size")
    model.add_argument("--max_size", type=int, default=None, help="override the checkpoint's input size")
    model.add_argument("--input_scale", type=scale_factor, default=None,
                       help="override the checkpoint's fixed input scale (cells look their best at the training one)")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output and args.output_dir:
        parser.error("--output and --output_dir both name where the submission goes; pass one of them")
    overrides = {"backbone": args.backbone, "use_attn": True if args.use_attn else None,
                 "num_classes": args.num_classes, "min_size": args.min_size, "max_size": args.max_size,
                 "input_scale": args.input_scale, "detections_per_img": args.detections_per_img,
                 "detections_per_class": args.detections_per_class}
    if args.output or args.output_dir:  # checked before minutes of prediction
        writable_dir(args.output_dir or Path(args.output).parent, "--output_dir" if args.output_dir else "--output")
    folder = Path(args.output_dir or Path(args.checkpoint[0]).parent)
    output = Path(args.output) if args.output else folder / "test-results.json"
    return predict_folder(args.checkpoint, args.test_dir, args.id_map_json, output, prediction_settings(args),
                          device=args.device, overrides=overrides, score_thresh=args.score_thresh,
                          num_workers=args.num_workers, save_labels=args.save_labels, label_thresh=args.label_thresh)


def predict_folder(checkpoint: str | Path | Sequence[str | Path], test_dir: str | Path, id_map_json: str | Path | None,
                   output: Path, settings: Settings = Settings(tile=None, batch_size=None), device: str | None = None,
                   overrides: dict[str, Any] | None = None, score_thresh: float = 0.0, num_workers: int = 0,
                   save_labels: str | Path | None = None, label_thresh: float = 0.5) -> Path:
    """Predict every test image and write the submission; returns its path. Several
    checkpoints are an ensemble; ``settings.tile`` None tiles at the training crop recorded
    in the (first) checkpoint, ``settings.batch_size`` None takes the device's default.
    ``id_map_json`` None: the map beside the folder, else the images numbered by name (and that
    map written beside the submission)."""
    id_map = find_id_map(Path(test_dir), id_map_json)
    dataset = UnlabelledImages(Path(test_dir), id_map)  # fails on a bad id map before the model loads
    torch_device = default_device(device)
    paths = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    loaded = [load_model(Path(path), overrides) for path in paths]
    models = [model.to(torch_device) for model, _, _ in loaded]
    resolved = settings.resolved(torch_device, loaded[0][2])
    if settings.tile is None and resolved.tile:
        print(f"tiles of {resolved.tile} px, the checkpoint's training --crop (--tile 0 predicts whole images)")
    # Tiles and views of one image fill a batch already; whole images of different sizes are
    # batched (padded together) only when asked.
    whole = not (resolved.tile or resolved.tta_scales) and settings.batch_size is not None
    loader = DataLoader(dataset, batch_size=resolved.batch_size if whole else 1, shuffle=False,
                        collate_fn=collate_fn, num_workers=num_workers, pin_memory=torch_device.type == "cuda")
    start = time.time()
    results = predict(models, loader, torch_device, resolved, desc="inference")
    results = [r for r in results if r["score"] >= score_thresh]
    write_json(Path(output), results)
    if id_map is None:  # the ids the submission uses, for evaluate.py and for the user
        write_json(Path(output).parent / ID_MAP_FILE, dataset.entries, indent=1)
        print(f"no id map: {len(dataset)} images numbered by file name -> {Path(output).parent / ID_MAP_FILE}")
    if save_labels:
        write_labels(results, dataset, Path(save_labels), label_thresh)
    seconds = time.time() - start
    print(f"{len(results)} detections on {len(dataset)} images in {seconds:.1f}s "
          f"({seconds / max(len(dataset), 1):.2f}s/image) -> {output}")
    return Path(output)


def write_labels(results: list[dict], dataset: UnlabelledImages, folder: Path, score_thresh: float) -> None:
    """Each test image as a sample of the training layout: its image and one uint16 label image per class, cells
    numbered by score (1 = best), each pixel the best-scoring detection's."""
    by_image: dict[int, list[dict]] = {}
    for r in results:
        by_image.setdefault(int(r["image_id"]), []).append(r)
    for entry in tqdm(dataset.entries, desc="label images", leave=False, disable=None):
        source = dataset.test_dir / entry["file_name"]
        height, width = read_image(source).shape[:2]
        kept, canvas = paint(by_image.get(int(entry["id"]), []), height, width, score_thresh)
        shown = np.unique(canvas[canvas > 0]) - 1  # detections with pixels left, best first
        rank = np.zeros(len(kept) + 1, dtype=np.uint16)
        rank[shown + 1] = np.arange(1, len(shown) + 1)
        classes = np.zeros(len(kept) + 1, dtype=np.int64)
        classes[1:] = [r["category_id"] for r in kept]
        out = folder / Path(entry["file_name"]).stem
        out.mkdir(parents=True, exist_ok=True)
        if source.suffix.lower() in TIFF_SUFFIXES:
            shutil.copyfile(source, out / IMAGE_FILE)
        else:  # the training layout holds TIFFs: a PNG or JPEG is written as one, its pixels as stored
            tifffile.imwrite(out / IMAGE_FILE, read_raw_image(source))
        for class_id, name in CLASS_FILES.items():
            tifffile.imwrite(out / name, np.where(classes[canvas] == class_id, rank[canvas], 0).astype(np.uint16))
    print(f"label images of {len(dataset.entries)} images -> {folder}")


if __name__ == "__main__":
    run_cli(main)
