"""Peak memory and seconds of merging tiled detections: neighbour lists vs a dense overlap matrix.

``tiling.merge_detections`` removes duplicates among every detection of every tile (and every
TTA view). A 900 px image cut into 256 px tiles is 20 tiles; at 1000 detections each that is
20 000 boxes, and a 2000 px image is 80 000. The straightforward overlap test, ``box_iou(boxes,
boxes) > 0``, holds N x N floats plus box_iou's N x N x 2 temporaries: it ran a 24 GB machine
out of memory on one CPM-15 image with tiles and flip TTA. ``tiling.overlapping_boxes`` builds
each box's neighbour list a block of rows at a time. Each variant runs in a fresh process so
its peak resident memory is its own; both must keep the same detections.

    python benchmarks/tile_merge.py                   # 12 tiles x 1000 detections
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import multiprocessing  # noqa: E402
import resource  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

import tiling  # noqa: E402
from benchmarks.common import base_parser, environment, print_table, ratio, setup, timed, write_results  # noqa: E402

NAME = "tile_merge"


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=12, help="tiles (or tiles x views) merged at once")
    parser.add_argument("--detections", type=int, default=1000, help="detections per tile")
    parser.add_argument("--tile", type=int, default=256, help="tile side in pixels")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = setup(args)
    context = multiprocessing.get_context("spawn")
    rows = []
    kept = {}
    for variant in ("neighbour lists", "dense box_iou"):
        with context.Pool(1) as pool:
            row, kept[variant] = pool.apply(_measure, (variant, args.tiles, args.detections, args.tile, args.seed))
        rows.append(row)
    same = kept["neighbour lists"] == kept["dense box_iou"]
    ours, dense = rows
    summary = {"boxes": args.tiles * args.detections, "same_detections_kept": same,
               "memory_ratio": ratio(ours["peak_gb"], dense["peak_gb"]),
               "speedup": ratio(dense["seconds"], ours["seconds"])}
    print_table(f"merge of {args.tiles} tiles x {args.detections} detections", rows,
                ["variant", "peak_gb", "seconds", "kept"])
    print(summary)
    write_results(args, NAME, {"benchmark": NAME, "environment": environment(device), "settings": vars(args), "rows": rows,
                               "summary": summary})
    return summary


def _measure(variant: str, tiles: int, detections: int, tile: int, seed: int) -> tuple[dict, list[int]]:
    """One merge in this (fresh) process: peak RSS above what the inputs already took."""
    parts = synthetic_parts(tiles, detections, tile, seed)
    if variant == "dense box_iou":
        tiling.overlapping_boxes = _dense_neighbours
    before = _rss_gb()
    merged, seconds = timed(lambda: tiling.merge_detections(parts, (tile * 8, tile * 8)))
    kept = [round(float(s), 6) for s in merged["scores"]]
    return {"variant": variant, "peak_gb": _rss_gb() - before, "seconds": seconds, "kept": len(kept)}, kept


def synthetic_parts(tiles: int, detections: int, tile: int, seed: int) -> list[dict]:
    """Per-tile detections as ``tiling._to_image_coords`` returns them: cell-sized boxes and
    mask crops on an 8 x 8 grid of tiles overlapping by a quarter, many overlapping each other."""
    rng = np.random.default_rng(seed)
    stride = tile * 3 // 4
    parts = []
    for index in range(tiles):
        y0, x0 = (index // 8 % 8) * stride, (index % 8) * stride
        corner = rng.uniform(0, tile - 45, size=(detections, 2))
        side = rng.uniform(8, 40, size=(detections, 2))
        boxes = np.concatenate([corner, corner + side], axis=1) + [x0, y0, x0, y0]
        crops = [(int(b[0]), int(b[1]), rng.random((int(s[1]) + 1, int(s[0]) + 1)) < 0.7) for b, s in zip(boxes, side)]
        parts.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                      "scores": torch.tensor(rng.random(detections), dtype=torch.float32),
                      "labels": torch.tensor(rng.integers(1, 5, detections)),
                      "cut": torch.tensor(rng.random(detections) < 0.05), "crops": crops})
    return parts


def _dense_neighbours(boxes: torch.Tensor) -> list[torch.Tensor]:
    """The straightforward overlap test: one N x N matrix from box_iou."""
    overlaps = box_iou(boxes, boxes) > 0
    return [row.nonzero().flatten() for row in overlaps]


def _rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


if __name__ == "__main__":
    main()
