"""A lever's runs against its baseline's, paired by split and seed, from `accuracy.py` JSON files.

A lever becomes a default only if it wins class-mean AP50 at maxDets 100 in every seed and
split, and each run lands in its own JSON file (one split and seed per call, so a stopped
session loses at most one). This reads those files and pairs every lever run with the
baseline run of the same split, seed and protocol, so the decision and its per-class figures
come from the files rather than from copying numbers by hand.

    python benchmarks/lever_table.py --post tile+img400+cls100 \
        --base benchmarks/results/accuracy_consep_split*_cells_s*.json --base_config cells \
        --lever benchmarks/results/accuracy_consep_split*_paste_s*.json --lever_config cells+paste
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
# (not --ema_decay: the --post rows score the raw weights)
PROTOCOL = ("train_dir", "val_split", "split_groups", "val_dir", "backbone", "weights", "epochs", "crop", "extra")
PATHS = ("train_dir", "split_groups", "val_dir")  # compared by their last two parts: runs start from other folders
FIX = "pass a JSON file written by benchmarks/accuracy.py --json"


Run = tuple[dict[str, float], dict[str, Any], Path]  # one run's metrics, its file's settings, the file


def runs_by_split_seed(paths: Sequence[Path], row: str) -> dict[tuple[int, int], Run]:
    """Each run of ``row`` in ``paths``, keyed by (split seed, seed), with its file's settings.

    Two files holding the same split and seed are refused: which one counts is the caller's
    decision, and taking either silently would let a rerun replace a loss."""
    found: dict[tuple[int, int], Run] = {}
    for path in paths:
        payload = read_json(path, fix=FIX)
        try:
            settings, runs = payload["settings"], payload["runs"]
            seeds, split_seed = [int(seed) for seed in settings["seeds"]], int(settings["split_seed"])
        except (KeyError, TypeError, ValueError) as err:
            raise UsageError(f"{path}: no settings with seeds and split_seed ({err!r}); {FIX}") from err
        if row not in runs:
            raise UsageError(f"{path}: no row {row!r} (its rows: {', '.join(sorted(runs))}); "
                             "check --post and the --*_config flag")
        if "+ensemble" in row or len(runs[row]) > len(seeds):
            raise UsageError(f"{path}: row {row!r} holds {len(runs[row])} runs for seeds {seeds}, so its runs "
                             "cannot be told apart by seed; compare runs of one seed each")
        for seed, run in zip(seeds, runs[row]):  # a stopped file holds its first seeds' runs, in order
            key = (split_seed, seed)
            if key in found:
                raise UsageError(f"split {key[0]} seed {key[1]} is in both {found[key][2]} and {path}; "
                                 "pass only the one that counts")
            found[key] = (run, settings, path)
    return found


def paired_rows(base: dict[tuple[int, int], Run], lever: dict[tuple[int, int], Run]) -> list[dict[str, Any]]:
    """One row per lever run whose baseline run exists, with the lever's change in class-mean
    AP50 (maxDets 100 and 1000) and in each class's AP50 at 100."""
    rows = []
    for key in sorted(lever):
        if key not in base:
            raise UsageError(f"{lever[key][2]}: no baseline run for split {key[0]} seed {key[1]}; "
                             "add its JSON file to --base")
        (b, b_settings, b_path), (x, x_settings, x_path) = base[key], lever[key]
        differ = [name for name in PROTOCOL if _setting(b_settings, name) != _setting(x_settings, name)]
        if differ:
            raise UsageError(f"{x_path} and {b_path} were run with different {', '.join(differ)}; "
                             "compare runs of one protocol")
        try:
            row = _changes(b, x)
        except KeyError as err:
            raise UsageError(f"{x_path} or {b_path}: no {err.args[0]} in a run; {FIX}") from err
        rows.append({"split": key[0], "seed": key[1], **row})
    return rows


def _setting(settings: dict[str, Any], name: str) -> Any:
    value = settings.get(name)
    return Path(value).parts[-2:] if name in PATHS and value else value


def _changes(b: dict[str, float], x: dict[str, float]) -> dict[str, Any]:
    """The lever's class-mean AP50 beside the baseline's, its changes per class and at 1000, and
    its training step as a multiple of the baseline's."""
    row = {"base": round(b["segm_AP50"], 4), "lever": round(x["segm_AP50"], 4),
           "change": round(x["segm_AP50"] - b["segm_AP50"], 4)}
    for c in range(1, NUM_CLASSES + 1):
        row[f"class {c}"] = round(x[f"segm_AP50_class{c}"] - b[f"segm_AP50_class{c}"], 3)
    row["change at 1000"] = round(x["segm_AP50_1000"] - b["segm_AP50_1000"], 4)
    if b.get("step_seconds") and x.get("step_seconds"):  # files from before accuracy.py recorded it have none
        row["step ×"] = round(x["step_seconds"] / b["step_seconds"], 2)
    return row


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--base", nargs="+", type=Path, required=True, help="the baseline's JSON files")
    parser.add_argument("--lever", nargs="+", type=Path, required=True, help="the lever's JSON files")
    parser.add_argument("--base_config", default="cells", help="the baseline's configuration name in its files")
    parser.add_argument("--lever_config", required=True, help="the lever's configuration name in its files")
    parser.add_argument("--post", default="tile+img400+cls100", type=_post,
                        help="the --post variant of accuracy.py compared (its rows are scored at maxDets 100 and 1000)")
    return parser.parse_args(argv)


def _post(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("name a --post variant: the training rows are scored at one maxDets only")
    return text


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    rows = paired_rows(runs_by_split_seed(args.base, f"{args.base_config}+{args.post}"),
                       runs_by_split_seed(args.lever, f"{args.lever_config}+{args.post}"))
    columns = ["split", "seed", "base", "lever", "change", *(f"class {c}" for c in range(1, NUM_CLASSES + 1)),
               "change at 1000", "step ×"]
    print_table(f"{args.lever_config} against {args.base_config}: segm AP50 at maxDets 100, --post {args.post}; "
                "the changes are the lever's minus the baseline's", rows, columns)
    wins = sum(row["change"] > 0 for row in rows)
    print(f"wins {wins} of {len(rows)} runs; a default needs every run")
    return rows


if __name__ == "__main__":
    run_cli(main)
