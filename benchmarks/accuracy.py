"""Held-out accuracy of training configurations at an equal budget, side by side.

Each configuration trains from the same flags plus its own, for the same number of epochs, on
the same seeded split (``--split_seed``), once per seed; the table reports segm AP, AP50 and
AP75 of the *last* epoch on the held-out images (no checkpoint selection on them), averaged
over seeds. A change becomes a default only if it wins here.

    python benchmarks/accuracy.py --configs stock cells --seeds 0 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_effnet_v2  # noqa: E402
import train_resnet  # noqa: E402

# Flags that differ between configurations; everything else is shared.
CONFIGS: dict[str, list[str]] = {
    "stock": ["--anchor_sizes", "32", "64", "128", "256", "512", "--min_size", "800", "--max_size", "1333",
              "--max_upscale", "100", "--detections_per_img", "100", "--box_score_thresh", "0.05",
              "--rpn_pre_nms_top_n_test", "1000", "--rpn_post_nms_top_n_test", "1000"],
    "cells": [],
    "cells+repeat": ["--repeat_thresh", "0.3"],
    "cells+ema": ["--ema_decay", "0.99"],
    "cells+tile": ["--tile", "256", "--tile_overlap", "0.25"],
}
METRICS = ("segm_AP", "segm_AP50", "segm_AP75")


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    script = train_resnet if args.backbone == "resnet" else train_effnet_v2
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            for seed in args.seeds:
                start = time.time()
                row = train_once(script, args, CONFIGS[name], seed, Path(tmp) / f"{name}_{seed}")
                row["seconds"] = round(time.time() - start, 1)
                runs.setdefault(name, []).append(row)
                print(f"{name} seed {seed}: " + ", ".join(f"{m} {row[m]:.4f}" for m in METRICS), flush=True)
    table = {name: {m: statistics.mean(r[m] for r in rows) for m in METRICS} for name, rows in runs.items()}
    print_table(table, args)
    result = {"settings": vars(args), "mean": table, "runs": runs}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_dir", default=str(ROOT.parent / "shared/data/cpm15_hw3/train"))
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["stock", "cells"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--split_seed", type=int, default=0, help="one held-out split for every run")
    parser.add_argument("--val_split", type=float, default=0.3, help="held-out share (3 of 10 CPM-15 images)")
    parser.add_argument("--backbone", choices=("resnet", "effnet"), default="resnet")
    parser.add_argument("--weights", default="none", help="imagenet where it can be downloaded")
    parser.add_argument("--epochs", type=int, default=8, help="equal budget for every configuration")
    parser.add_argument("--crop", type=int, default=256, help="CPU-sized training windows")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to every run")
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/accuracy.json"))
    return parser


def train_once(script, args: argparse.Namespace, flags: list[str], seed: int, out: Path) -> dict:
    """Train one configuration and return the held-out metrics of its last epoch."""
    script.main(["--train_dir", args.train_dir, "--output_dir", str(out), "--weights", args.weights,
                 "--epochs", str(args.epochs), "--crop", str(args.crop), "--warmup_epochs", "1", "--use_cosine",
                 "--lr", "4e-4", "--val_split", str(args.val_split), "--split_seed", str(args.split_seed),
                 "--seed", str(seed), "--num_workers", "0", *flags, *args.extra])
    last = json.loads((out / "history.json").read_text())[-1]
    return {m: float(last[m]) for m in METRICS}


def print_table(table: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    print(f"\nheld-out segm metrics, last epoch, mean of seeds {args.seeds} ({args.epochs} epochs, crop {args.crop})")
    print(f"{'configuration':<16}" + "".join(f"{m:>12}" for m in METRICS))
    for name, row in table.items():
        print(f"{name:<16}" + "".join(f"{row[m]:>12.4f}" for m in METRICS))


if __name__ == "__main__":
    main()
