"""The mask merge's rival pairs at growing detection counts: the x sweep against all N x N pairs.

``merging.greedy_mask_merge`` first finds every (earlier, later) pair of same-class detections
whose boxes overlap. A window streamed with a low score threshold holds tens of thousands of
candidates; the N x N comparison that found the pairs before needed N² bytes per temporary
(gigabytes at 40,000) and minutes, while the pairs themselves grow about linearly with N. The
scene: ``--window`` px square, one cell per 8 detections (the copies that tiles and views give
of a cell, jittered by 3 px), 5 to 15 px radius, two classes, random scores.

Rows: ``dense`` (the N x N comparison, the straightforward way), ``sweep``
(``merging._rival_pairs``, what the merge runs), each N in the same process, the peak resident
memory above the scene from the kernel's high-water mark; ``merge_s``: the whole
``greedy_mask_merge`` (pairs, pixel intersections, greedy rounds) on the same scene.

    python benchmarks/merge_scaling.py                     # 2,500 to 40,000 detections
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (base_parser, environment, peak_rss_kb, print_table, ratio,  # noqa: E402
                               reset_peak_rss_kb, setup, timed, write_results)
from argtypes import checked, non_negative_int, positive_int  # noqa: E402
from masks import PackedMasks  # noqa: E402
from merging import _rival_pairs, greedy_mask_merge  # noqa: E402

NAME = "merge_scaling"
_window = checked(int, lambda v: v >= 64, "64 or more")  # the scene's cells are up to 40 px from its edge
PairFinder = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=positive_int, nargs="+", default=[2500, 5000, 10000, 20000, 40000],
                        help="detection counts, each one scene")
    parser.add_argument("--window", type=_window, default=1536, help="side of the square scene in px (64 or more)")
    parser.add_argument("--dense_max", type=non_negative_int, default=20000,
                        help="largest count the N x N variant runs at (its memory grows as N²: gigabytes at 20,000)")
    return parser


def dense_pairs(boxes: torch.Tensor, labels: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward rival pairs: every pair compared in one N x N boolean matrix."""
    b = boxes.float()
    index = torch.arange(len(key), device=key.device)
    hit = ((b[:, None, 0] < b[None, :, 2]) & (b[None, :, 0] < b[:, None, 2])
           & (b[:, None, 1] < b[None, :, 3]) & (b[None, :, 1] < b[:, None, 3]))
    earlier = (key[:, None] > key[None, :]) | ((key[:, None] == key[None, :]) & (index[:, None] < index[None, :]))
    first, second = (hit & earlier & (labels[:, None] == labels[None, :])).nonzero(as_tuple=True)
    return first, second


def scene(count: int, window: int, seed: int) -> tuple[PackedMasks, torch.Tensor, torch.Tensor]:
    """``count`` detections, 8 jittered copies of each cell, masks filling their boxes."""
    rng = np.random.default_rng(seed)
    centres = np.repeat(rng.uniform(20, window - 20, (count // 8 + 1, 2)), 8, axis=0)[:count]
    centres += rng.normal(0, 3, (count, 2))
    radius = rng.integers(5, 15, (count, 1))
    boxes = np.clip(np.round(np.concatenate([centres - radius, centres + radius], axis=1)), 0, window).astype(np.int64)
    crops = [np.ones((y2 - y1, x2 - x1), dtype=np.uint8) for x1, y1, x2, y2 in boxes]
    masks = PackedMasks.from_crops(crops, boxes, (window, window))
    return masks, torch.from_numpy(rng.integers(1, 3, count)), torch.from_numpy(rng.random(count).astype(np.float32))


def measure(finder: PairFinder, masks: PackedMasks, labels: torch.Tensor, key: torch.Tensor,
            device: torch.device) -> tuple[tuple[torch.Tensor, torch.Tensor], float, float]:
    """The pairs, seconds and peak MB above the memory in use at the start: GPU memory on a
    GPU, resident host memory on a CPU."""
    inputs = masks.boxes.to(device), labels.to(device), key.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        pairs, seconds = timed(lambda: finder(*inputs), device)
        return pairs, seconds, (torch.cuda.max_memory_allocated(device) - base) / 2**20
    base = reset_peak_rss_kb()
    pairs, seconds = timed(lambda: finder(*inputs), device)
    return pairs, seconds, (peak_rss_kb() - base) / 1024


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = setup(args)
    rows = []
    for count in args.sizes:
        masks, labels, key = scene(count, args.window, args.seed)
        sweep, sweep_s, sweep_mb = measure(_rival_pairs, masks, labels, key, device)
        row = {"detections": count, "pairs": len(sweep[0]), "sweep_s": round(sweep_s, 3), "sweep_mb": round(sweep_mb)}
        if count <= args.dense_max:
            dense, dense_s, dense_mb = measure(dense_pairs, masks, labels, key, device)
            same = all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(sweep, dense))
            row.update(dense_s=round(dense_s, 3), dense_mb=round(dense_mb), speedup=ratio(dense_s, sweep_s), same=same)
        _, merge_s = timed(lambda: greedy_mask_merge(masks.to(device), labels.to(device), key.to(device)), device)
        row["merge_s"] = round(merge_s, 2)
        rows.append(row)
        print(row, flush=True)
    print_table("rival pairs of the mask merge: x sweep vs N x N", rows,
                ["detections", "pairs", "dense_s", "sweep_s", "speedup", "dense_mb", "sweep_mb", "same", "merge_s"])
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    payload = {"benchmark": NAME, "environment": environment(device), "settings": settings, "rows": rows}
    write_results(args, NAME, payload)
    return payload


if __name__ == "__main__":
    main()
