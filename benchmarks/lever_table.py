"""A lever's runs against its baseline's, paired by split and seed, from `accuracy.py` JSON files.

A lever becomes a default only if it wins class-mean AP50 at maxDets 100 in every seed and
split, and each run lands in its own JSON file (one split and seed per call, so a stopped
session loses at most one). This reads those files and pairs every lever run with the
baseline run of the same split, seed and protocol, so the decision and its per-class figures
come from the files rather than from copying numbers by hand.

    python benchmarks/lever_table.py --post tile+img400+cls100 \
        --base benchmarks/results/accuracy_consep_split*_cells_s*.json --base_config cells \
        --lever benchmarks/results/accuracy_consep_split*_hed_s*.json --lever_config cells+hed
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from argtypes import HelpFormatter  # noqa: E402
from benchmarks.common import print_table  # noqa: E402
from cli import run_cli  # noqa: E402
from dataloader import NUM_CLASSES, read_json  # noqa: E402
from errors import UsageError  # noqa: E402

# settings that must agree between a lever run and its baseline: the data, its split and the budget
PROTOCOL = ("train_dir", "val_split", "split_groups", "val_dir", "backbone", "weights", "epochs", "crop",
            "ema_decay", "extra")


def runs_by_split_seed(paths: Sequence[Path], row: str) -> dict[tuple[int, int], tuple[dict[str, Any], dict[str, Any], Path]]:
    """Each run of ``row`` in ``paths``, keyed by (split seed, seed), with its file's settings.

    Two files holding the same split and seed are refused: which one counts is the caller's
    decision, and taking either silently would let a rerun replace a loss."""
    found: dict[tuple[int, int], tuple[dict[str, Any], dict[str, Any], Path]] = {}
    for path in paths:
        payload = read_json(path, fix="pass a JSON file written by benchmarks/accuracy.py --json")
        settings, runs = payload.get("settings", {}), payload.get("runs", {})
        if row not in runs:
            raise UsageError(f"{path}: no row {row!r} (its rows: {', '.join(sorted(runs))}); "
                             "check --post and the --*_config flag")
        for seed, run in zip(settings["seeds"], runs[row]):
            key = (int(settings["split_seed"]), int(seed))
            if key in found:
                raise UsageError(f"split {key[0]} seed {key[1]} is in both {found[key][2]} and {path}; "
                                 "pass only the one that counts")
            found[key] = (run, settings, path)
    return found


def paired_rows(base: dict, lever: dict) -> list[dict[str, Any]]:
    """One row per lever run whose baseline run exists, with the lever's change in class-mean
    AP50 (maxDets 100 and 1000) and in each class's AP50 at 100."""
    rows = []
    for key in sorted(lever):
        if key not in base:
            raise UsageError(f"{lever[key][2]}: no baseline run for split {key[0]} seed {key[1]}; "
                             "add its JSON file to --base")
        (b, b_settings, b_path), (x, x_settings, x_path) = base[key], lever[key]
        differ = [name for name in PROTOCOL if b_settings.get(name) != x_settings.get(name)]
        if differ:
            raise UsageError(f"{x_path} and {b_path} were run with different {', '.join(differ)}; "
                             "compare runs of one protocol")
        row = {"split": key[0], "seed": key[1], "base": round(b["segm_AP50"], 4), "lever": round(x["segm_AP50"], 4),
               "change": round(x["segm_AP50"] - b["segm_AP50"], 4)}
        for c in range(1, NUM_CLASSES + 1):
            row[f"class {c}"] = round(x[f"segm_AP50_class{c}"] - b[f"segm_AP50_class{c}"], 3)
        row["change at 1000"] = round(x["segm_AP50_1000"] - b["segm_AP50_1000"], 4)
        rows.append(row)
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--base", nargs="+", type=Path, required=True, help="the baseline's JSON files")
    parser.add_argument("--lever", nargs="+", type=Path, required=True, help="the lever's JSON files")
    parser.add_argument("--base_config", default="cells", help="the baseline's configuration name in its files")
    parser.add_argument("--lever_config", required=True, help="the lever's configuration name in its files")
    parser.add_argument("--post", default="tile+img400+cls100",
                        help="the --post variant compared (empty: the training rows, whole images)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    suffix = f"+{args.post}" if args.post else ""
    rows = paired_rows(runs_by_split_seed(args.base, args.base_config + suffix),
                       runs_by_split_seed(args.lever, args.lever_config + suffix))
    columns = ["split", "seed", "base", "lever", "change", *(f"class {c}" for c in range(1, NUM_CLASSES + 1)),
               "change at 1000"]
    where = f"under --post {args.post}" if args.post else "whole images"
    print_table(f"{args.lever_config} against {args.base_config}: segm AP50 at maxDets 100, {where}; "
                "the changes are the lever's minus the baseline's", rows, columns)
    wins = sum(row["change"] > 0 for row in rows)
    print(f"wins {wins} of {len(rows)} runs; a default needs every run")
    return rows


if __name__ == "__main__":
    run_cli(main)
