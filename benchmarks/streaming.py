"""Peak memory of predicting one large image streamed in windows (``streaming.py``) and whole,
as the image grows, with every cell known.

Each size gets a generated whole-slide-like image (``synthetic.cell_grid``: a cell per
``--spacing`` square, about 40,000 on 8192 x 8192), written as a tiled, compressed TIFF whose
pixels carry the cell ids (``synthetic.id_image``), so a perfect predictor
(``synthetic.oracle_window``) stands in for the model: what is measured is the streaming
itself (lazy reads, windows, cores, incremental writing), not a network. Each (size, variant)
runs in a fresh process and reports its peak resident memory above the process with its
imports loaded (``peak_rss_mb``, from the kernel's high-water mark, reset after the imports):

- ``streamed``: ``LazyImage`` + ``stream_image`` at ``--window``, the submission (RLE JSON),
  the GeoJSON and the CSV written window by window, as ``inference.py`` does;
- ``whole``: the image read whole, predicted whole, its submission written at once (the path
  of an image under ``--window``), without the per-cell outputs.

``kept_all``: the submission holds every generated cell once; ``same_as_whole``: the streamed
submission equals the whole one, cell for cell (class, score, RLE).

With ``--checkpoint``, a trained model predicts a ``--model_size`` mosaic of real images
(``--mosaic_dir``: a training-layout folder) streamed at ``--model_window`` and whole, both
without caps, on the same tiles: the cells both paths give are compared (identical RLE and
class; scores within 1e-4).

    python benchmarks/streaming.py          # --sizes 2048 4096 8192 --window 2048
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (base_parser, environment, peak_rss_kb, print_table, ratio,  # noqa: E402
                               reset_peak_rss_kb, write_results)

NAME = "streaming"
VARIANTS = ("streamed", "whole")


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192], help="sides of the images")
    parser.add_argument("--window", type=int, default=2048, help="inference.py --window")
    parser.add_argument("--tile", type=int, default=256, help="the tile the windows align with (training --crop)")
    parser.add_argument("--spacing", type=int, default=41, help="one cell per square of this side")
    parser.add_argument("--radius", type=int, nargs=2, default=[5, 12], help="cell radius range, px")
    parser.add_argument("--work_dir", default=None, help="where the generated images go (default: a temp folder)")
    parser.add_argument("--checkpoint", default=None, help="also compare the two paths with this trained model")
    parser.add_argument("--mosaic_dir", default=None, help="training-layout folder whose images make the mosaic")
    parser.add_argument("--model_size", type=int, default=2048, help="side of the mosaic the model predicts")
    parser.add_argument("--model_window", type=int, default=1536, help="--window of the model comparison")
    parser.add_argument("--model_score_thresh", type=float, default=0.05,
                        help="the model's box_score_thresh in the comparison: without caps, a CPU cannot merge the "
                             "thousand detections a tile of 256 px holds at 0")
    parser.add_argument("--same_process", action="store_true",
                        help="measure every variant in this process: quicker, but peak_rss_mb then means nothing")
    parser.add_argument("--one", nargs=3, metavar=("PATH", "VARIANT", "OUT"), default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args, Path(args.one[0]), args.one[1], Path(args.one[2]))))
        return {}
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        for size in args.sizes:
            path, cells = _generate(Path(work), size, args)
            found = {v: measure_one(args, path, v, Path(work) / v) if args.same_process
                     else _in_fresh_process(sys.argv[1:] if argv is None else argv, path, v, Path(work)) for v in VARIANTS}
            for variant, row in found.items():
                rows.append({"size": size, "cells": cells, **row, "kept_all": row["detections"] == cells and row.pop("distinct")})
            rows[-2]["same_as_whole"] = found["streamed"]["digest"] == found["whole"]["digest"]
            rows[-2]["rss_vs_whole"] = ratio(found["streamed"]["peak_rss_mb"], found["whole"]["peak_rss_mb"])
            path.unlink()
    for row in rows:
        row.pop("digest")
    print_table(f"one image, cells known (oracle), --window {args.window}, tiles of {args.tile}", rows,
                ["size", "variant", "cells", "detections", "kept_all", "windows", "peak_rss_mb", "seconds",
                 "same_as_whole", "rss_vs_whole"])
    streamed = [r["peak_rss_mb"] for r in rows if r["variant"] == "streamed"]
    targets = {"streamed_peak_flat_within_20pct": max(streamed) <= 1.2 * min(streamed),
               "every_cell_kept": all(r["kept_all"] for r in rows),
               "streamed_equals_whole": all(r.get("same_as_whole", True) for r in rows)}
    model = compare_with_model(args) if args.checkpoint else None
    if model:
        print_table(f"a trained model on a {args.model_size} px mosaic, --window {args.model_window}", [model],
                    list(model))
        targets["model_streamed_equals_whole"] = model["identical"] == model["whole_cells"] == model["streamed_cells"]
    print(f"targets met: {targets}")
    payload = {"model_comparison": model, "benchmark": NAME, "environment": environment(torch.device("cpu")),
               "settings": {k: v for k, v in vars(args).items() if k not in ("json", "one", "work_dir")},
               "rows": rows, "targets_met": targets}
    write_results(args, NAME, payload)
    return payload


def _generate(folder: Path, size: int, args: argparse.Namespace) -> tuple[Path, int]:
    from synthetic import cell_grid, id_image

    label = cell_grid((size, size), args.spacing, tuple(args.radius), seed=args.seed)
    path = folder / f"slide_{size}.tif"
    tifffile.imwrite(path, id_image(label), photometric="rgb", compression="zlib", tile=(512, 512))
    return path, int(label.max())


def _in_fresh_process(argv: Sequence[str], path: Path, variant: str, work: Path) -> dict[str, Any]:
    """One measurement in its own process, so ``ru_maxrss`` is this variant's peak alone."""
    cmd = [sys.executable, __file__, *argv, "--one", str(path), variant, str(work / variant)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} on {path.name}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_one(args: argparse.Namespace, path: Path, variant: str, out: Path) -> dict[str, Any]:
    from cell_outputs import CellWriter, painted_window
    from coco import detections_to_coco
    from dataloader import read_raw_image
    from files import JsonArrayWriter, write_json
    from streaming import LazyImage, stream_image
    from synthetic import oracle_window

    out.mkdir(parents=True, exist_ok=True)
    base = reset_peak_rss_kb()
    start = time.perf_counter()
    windows = 1
    if variant == "whole":
        results = detections_to_coco(oracle_window(read_raw_image(path)), 1)
        write_json(out / "sub.json", results)
    else:
        windows, numbered = 0, 0
        with LazyImage(path) as image, JsonArrayWriter(out / "sub.json") as submission, \
                CellWriter([f"class{c}" for c in range(1, 5)], None, out / "geo", out / "cells.csv") as writer:
            for part in stream_image(image, oracle_window, args.window, args.tile, 0.25):
                submission.extend(detections_to_coco(part.cells(image.size), 1))
                cells = painted_window(path.name, 1, path, part.pixels, part.origin, part.dets, part.core.numpy(), 0.0,
                                       numbered + 1, False)  # --label_rule score: as its README row was measured
                writer.add(cells, image.size)
                numbered += len(cells.cells)
                windows += 1
    seconds = time.perf_counter() - start
    peak = peak_rss_kb() - base
    results = json.loads((out / "sub.json").read_text())  # after the peak was taken
    key = sorted((r["category_id"], r["score"], r["segmentation"]["counts"]) for r in results)
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()
    return {"variant": variant, "detections": len(results), "windows": windows, "peak_rss_mb": round(peak / 1024, 1),
            "seconds": round(seconds, 1), "digest": digest, "distinct": len(set(key)) == len(key)}


def compare_with_model(args: argparse.Namespace) -> dict[str, Any]:
    """The cells of a trained model on a mosaic of real images, streamed and whole."""
    from checkpoint import load_model
    from coco import detections_to_coco
    from dataloader import IMAGE_FILE, list_samples, read_raw_image, to_float_rgb
    from predictor import Settings, predict_images
    from streaming import LazyImage, model_predictor, stream_image

    patches = [read_raw_image(sample / IMAGE_FILE) for sample in list_samples(Path(args.mosaic_dir))]
    side = patches[0].shape[0]
    per_row = -(-args.model_size // side)
    rows = [np.concatenate([patches[(r * per_row + c) % len(patches)] for c in range(per_row)], axis=1)
            for r in range(per_row)]
    mosaic = np.ascontiguousarray(np.concatenate(rows, axis=0)[:args.model_size, :args.model_size])
    model, _, state = load_model(Path(args.checkpoint), {"box_score_thresh": args.model_score_thresh})
    device = torch.device(args.device)
    model = model.to(device).eval()
    settings = Settings(tile=None, batch_size=None, detections_per_img=0, detections_per_class=0).resolved(device, state)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        path = Path(work) / "mosaic.tif"
        tifffile.imwrite(path, mosaic, photometric="rgb", compression="zlib", tile=(512, 512))
        start = time.perf_counter()
        with LazyImage(path) as image:
            streamed = [r for part in stream_image(image, model_predictor([model], device, settings, image),
                                                   args.model_window, settings.tile, settings.tile_overlap)
                        for r in detections_to_coco(part.cells(image.size), 1)]
        streamed_s = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        image = torch.from_numpy(to_float_rgb(mosaic, Path("mosaic"))).permute(2, 0, 1).contiguous().to(device)
        whole = detections_to_coco(predict_images([model], [image], settings)[0], 1)
    whole_s = time.perf_counter() - start
    by_mask = {(r["category_id"], r["segmentation"]["counts"]): r["score"] for r in whole}
    same = sum(abs(by_mask.get((r["category_id"], r["segmentation"]["counts"]), -1.0) - r["score"]) <= 1e-4
               for r in streamed)
    return {"size": args.model_size, "window": args.model_window, "tile": settings.tile,
            "score_thresh": args.model_score_thresh,
            "whole_cells": len(whole), "streamed_cells": len(streamed), "identical": same,
            "whole_s": round(whole_s, 1), "streamed_s": round(streamed_s, 1)}


if __name__ == "__main__":
    main()
