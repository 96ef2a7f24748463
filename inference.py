"""Checkpoint + test folder -> test-results.json (COCO results with RLE masks).

The model is rebuilt from the checkpoint's config, so no architecture flag is needed:
    python inference.py --checkpoint outputs/resnet101/best.pth
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader

from checkpoint import load_model, write_json
from cli import run_cli, writable_dir
from dataloader import HW3TestDataset, collate_fn
from engine import predict
from model import DEFAULT_CONFIG, backbone_name, scale_factor

TTA_SCALES = (1.0,)  # flips only, at the input scale: what benchmarks/accuracy.py measured to help


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="best.pth or last.pth written by a train script")
    parser.add_argument("--test_dir", default="dataset/test_release", help="folder of test *.tif")
    parser.add_argument("--id_map_json", default="dataset/test_image_name_to_ids.json",
                        help="list of {file_name, id, height, width}")
    parser.add_argument("--output_dir", default=None,
                        help="folder of the submission, <output_dir>/test-results.json (default: the checkpoint's)")
    parser.add_argument("--output", default=None, help="exact submission path, instead of --output_dir")
    parser.add_argument("--batch_size", type=int, default=1, help="images per forward pass")
    parser.add_argument("--num_workers", type=int, default=2, help="image-decoding worker processes")
    parser.add_argument("--device", default=None, help="cuda, cpu (default: CUDA when present)")
    parser.add_argument("--use_amp", action="store_true", help="fp16 on CUDA, bf16 on CPU")
    parser.add_argument("--score_thresh", type=float, default=0.0,
                        help="drop detections below this score (0 keeps all: AP rewards low-score hits)")
    parser.add_argument("--tile", type=int, default=None,
                        help="predict images larger than this tile by tile, each tile scaled like a training crop "
                             "(0: whole images; default: the --crop the checkpoint was trained with, which scores "
                             "higher, see README)")
    parser.add_argument("--tile_overlap", type=float, default=0.25,
                        help="overlap of neighbouring tiles as a share of --tile; make it exceed the largest cell")
    parser.add_argument("--tta", dest="tta", action="store_true", default=True,
                        help="test-time augmentation: 4 flips x --tta_scales, merged by mask NMS (on by default: "
                             "+0.018 held-out segm AP50 on top of the default tiles, see README)")
    parser.add_argument("--no_tta", dest="tta", action="store_false", default=argparse.SUPPRESS,  # --tta's default
                        help="one view per image: 4x faster")
    parser.add_argument("--tta_scales", type=float, nargs="+", default=list(TTA_SCALES), help="image scales for --tta")
    parser.add_argument("--mask_thresh", type=probability, default=0.5,
                        help="a pixel belongs to a cell when its mask probability exceeds this (torchvision: 0.5)")
    parser.add_argument("--backbone", type=backbone_name, default=None,
                        help="resnet or effnet, only checked against the checkpoint (which knows its backbone)")
    parser.add_argument("--use_attn", action="store_true", help="only checked against the checkpoint")
    parser.add_argument("--num_classes", type=int, default=None, help="only checked against the checkpoint")
    parser.add_argument("--min_size", type=int, default=None, help="override the checkpoint's input size")
    parser.add_argument("--max_size", type=int, default=None, help="override the checkpoint's input size")
    parser.add_argument("--input_scale", type=scale_factor, default=None,
                        help="override the checkpoint's fixed input scale (cells look their best at the training one)")
    parser.add_argument("--detections_per_img", type=int, default=None,
                        help=f"override the checkpoint's limit (default there: {DEFAULT_CONFIG['detections_per_img']})")
    return parser


def probability(text: str) -> float:
    """argparse type for a threshold on probabilities: 0 or 1 would give box-filling or empty masks."""
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output and args.output_dir:
        parser.error("--output and --output_dir both name where the submission goes; pass one of them")
    overrides = {"backbone": args.backbone, "use_attn": True if args.use_attn else None,
                 "num_classes": args.num_classes, "min_size": args.min_size, "max_size": args.max_size,
                 "input_scale": args.input_scale, "detections_per_img": args.detections_per_img}
    if args.output or args.output_dir:  # checked before minutes of prediction
        writable_dir(args.output_dir or Path(args.output).parent, "--output_dir" if args.output_dir else "--output")
    folder = Path(args.output_dir or Path(args.checkpoint).parent)
    output = Path(args.output) if args.output else folder / "test-results.json"
    return predict_folder(args.checkpoint, args.test_dir, args.id_map_json, output, batch_size=args.batch_size,
                          device=args.device, use_amp=args.use_amp, overrides=overrides,
                          score_thresh=args.score_thresh, num_workers=args.num_workers, tile=args.tile,
                          tile_overlap=args.tile_overlap, tta_scales=args.tta_scales if args.tta else None,
                          mask_thresh=args.mask_thresh)


def training_tile(state: dict[str, Any]) -> int:
    """The tile a checkpoint predicts best with: its training --crop (0, whole images, if it had none)."""
    return int((state.get("args") or {}).get("crop") or 0)


def predict_folder(checkpoint: str | Path, test_dir: str | Path, id_map_json: str | Path, output: Path,
                   batch_size: int = 1, device: str | None = None, use_amp: bool = False,
                   overrides: dict[str, Any] | None = None, score_thresh: float = 0.0,
                   num_workers: int = 0, tile: int | None = None, tile_overlap: float = 0.25,
                   tta_scales: Sequence[float] | None = TTA_SCALES, mask_thresh: float = 0.5) -> Path:
    """Predict every test image and write the submission; returns its path. ``tile=None``
    tiles at the training crop recorded in the checkpoint (whole images if it had none);
    ``tta_scales=None`` predicts one view per image."""
    dataset = HW3TestDataset(Path(test_dir), Path(id_map_json))  # fails on a bad id map before the model loads
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, config, state = load_model(Path(checkpoint), overrides)
    if tile is None:
        tile = training_tile(state)
        if tile:
            print(f"tiles of {tile} px, the checkpoint's training --crop (--tile 0 predicts whole images)")
    model.to(torch_device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                        num_workers=num_workers, pin_memory=torch_device.type == "cuda")
    start = time.time()
    results = predict(model, loader, torch_device, use_amp, desc="inference", tile=tile, tile_overlap=tile_overlap,
                      tta_scales=tta_scales, mask_thresh=mask_thresh)
    results = [r for r in results if r["score"] >= score_thresh]
    write_json(Path(output), results)
    seconds = time.time() - start
    print(f"{len(results)} detections on {len(dataset)} images in {seconds:.1f}s "
          f"({seconds / max(len(dataset), 1):.2f}s/image) -> {output}")
    return Path(output)


if __name__ == "__main__":
    run_cli(main)
