"""Seconds to read a submission's RLE masks on the host, as ``evaluate.py`` and the per-cell
outputs do: each mask decoded at the image's size (COCO's decoder) against read from its runs
(``coco.rle_runs``, ``coco.packed_rles``), side by side on the same masks.

Two measurements, each with its result checked equal:

- **paint**: one image's cells painted best first (``coco.paint``, behind ``--save_labels``,
  GeoJSON, CSV and evaluate.py's F1), against the canvas painted from full-size decodes;
- **check**: a submission's masks checked to cover their image (``scoring.read_submission``),
  against the same check by merging each mask with an empty one (COCO's C code, which works at
  the image's size).

    python benchmarks/rle_reading.py                   # a 4096 x 4096 image, 1000 cells
    python benchmarks/rle_reading.py --size 1000 1000 --cells 300
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.common import base_parser, environment, print_table, ratio, setup, timed, write_results  # noqa: E402
from coco import mask_util, paint  # noqa: E402
from scoring import _mask_problem  # noqa: E402

NAME = "rle_reading"


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=[4096, 4096], metavar=("H", "W"))
    parser.add_argument("--cells", type=int, default=1000, help="cells of the image (the default cap)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each way (the fastest is reported)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = setup(args)
    height, width = args.size
    results = _cells(np.random.default_rng(args.seed), height, width, args.cells)
    rows = []
    for job, reference, ours in (("paint", lambda: _decoded_canvas(results, height, width),
                                  lambda: paint(results, height, width, 0.0)[1]),
                                 ("check", lambda: [_merged_check(r) for r in results],
                                  lambda: [_mask_problem(r) for r in results])):
        (expected, before), (found, after) = (_fastest(run, args.repeats) for run in (reference, ours))
        same = bool(np.array_equal(expected, found)) if job == "paint" else found == [""] * len(results) == expected
        rows.append({"job": job, "decoded_seconds": before, "runs_seconds": after,
                     "speedup": ratio(before, after), "same_result": same})
    print_table(f"RLE masks read on the host: {args.cells} cells of a {height} x {width} image", rows,
                ["job", "decoded_seconds", "runs_seconds", "speedup", "same_result"])
    payload = {"benchmark": NAME, "environment": environment(device),
               "settings": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows}
    write_results(args, NAME, payload)
    return payload


def _fastest(run: Any, repeats: int) -> tuple[Any, float]:
    timings = [timed(run) for _ in range(max(repeats, 1))]
    return timings[0][0], min(seconds for _, seconds in timings)


def _cells(rng: np.random.Generator, height: int, width: int, count: int) -> list[dict]:
    """Nucleus-sized ellipses (radii 4 to 15 px) at random places, as COCO results."""
    results = []
    for k in range(count):
        ry, rx = rng.uniform(4, 15, 2)
        cy, cx = rng.uniform(16, height - 16), rng.uniform(16, width - 16)
        y0, y1, x0, x1 = int(cy - ry), int(cy + ry) + 1, int(cx - rx), int(cx + rx) + 1
        yy, xx = np.mgrid[y0:y1, x0:x1]
        mask = np.zeros((height, width), np.uint8, order="F")
        mask[y0:y1, x0:x1] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        rle = mask_util.encode(mask)
        results.append({"image_id": 1, "category_id": 1 + k % 4, "score": float(rng.uniform(0.05, 1.0)),
                        "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")}})
    return results


def _decoded_canvas(results: list[dict], height: int, width: int) -> np.ndarray:
    """The canvas painted as before ``coco.packed_rles``: each mask decoded at the image's size."""
    kept = sorted(results, key=lambda r: -r["score"])
    canvas = np.zeros((height, width), dtype=np.int32)
    for k in range(len(kept) - 1, -1, -1):
        canvas[mask_util.decode(kept[k]["segmentation"]).astype(bool)] = k + 1
    return canvas


def _merged_check(result: dict) -> str:
    """The mask check done by merging with an empty mask of the image's size ("" when whole)."""
    mask = result["segmentation"]
    height, width = mask["size"]
    empty = mask_util.frPyObjects({"size": [height, width], "counts": [height * width]}, height, width)
    return "" if mask_util.merge([mask, empty])["counts"].decode("ascii") == mask["counts"] else "differs"


if __name__ == "__main__":
    main()
