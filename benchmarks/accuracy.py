"""Held-out accuracy of training configurations at an equal budget, side by side.

Each configuration trains from the same flags plus its own, for the same number of epochs, on
the same seeded split (``--split_seed``), once per seed, validating only after the last
epoch, on whole images. The table reports segm AP, AP50 and AP75 of that last epoch on the
held-out images (no checkpoint selection on them), averaged over seeds. Every run also keeps
an EMA of its weights (``--ema_decay``), scored beside the raw weights, so "+ema" costs no
extra training; the inference-time additions (``--post``: tiled prediction, TTA) are scored
on the same run's final raw weights. A change becomes a default only if it wins here.

Two rows bound what is left to gain: ``ceiling``, the ground truth itself scored (with one
class and hundreds of cells per image, maxDets 100 caps recall), and ``tile+oracle``, the
tiled detections ranked by their true mask IoU (the most any re-scoring of them can reach);
with four classes ``tile+trueclass`` gives each of them the class of the true cell it matches
(the most better classification of them can reach).

Four classes: every row also carries segm AP50 per class at maxDets 100 (the leaderboard's
count, per image and class) and at 1000, and F1 per class; the ``--post`` rows and the
ceiling are scored at both maxDets (``scoring.score``), the training rows at
``--eval_max_dets``. ``--split_groups`` holds out whole source images (CoNSeP's patches
overlap), ``--val_dir`` an explicit folder.

    python benchmarks/accuracy.py --configs stock_native cells --seeds 0 1 --post tile tta
    python benchmarks/accuracy.py --train_dir ../shared/data/consep_hw3/train --configs defaults \
        --split_groups ../shared/data/consep_hw3/manifest.json --val_split 0.25 --post tile
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from faster_coco_eval import COCO  # noqa: E402
from faster_coco_eval.core import mask as mask_util  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

import train_effnet_v2  # noqa: E402
import train_resnet  # noqa: E402
import training  # noqa: E402
from benchmarks.cell_types import CellTypeClassifier, cell_features, rescored  # noqa: E402
from class_context import rescore  # noqa: E402
from checkpoint import load_checkpoint, load_model, saved_args  # noqa: E402
from cli import run_cli  # noqa: E402
from coco import build_coco_gt, matching_metrics  # noqa: E402
from errors import UsageError  # noqa: E402
from dataloader import NUM_CLASSES, LabelledImages, collate_fn, list_samples  # noqa: E402
from argtypes import HelpFormatter  # noqa: E402
from flags import TTA_SCALES  # noqa: E402
from journal import SUFFIX as JOURNAL_SUFFIX  # noqa: E402
from journal import PredictionJournal, run_key  # noqa: E402
from predictor import Settings, class_count, predict_each  # noqa: E402
from scoring import score  # noqa: E402

# The native scale every configuration but the defaults was measured at (the min_size rule).
NATIVE = ["--input_scale", "0"]
STOCK_HEADS = [*NATIVE, "--anchor_sizes", "32", "64", "128", "256", "512", "--detections_per_img", "100",
               "--box_score_thresh", "0.05", "--rpn_pre_nms_top_n_test", "1000", "--rpn_post_nms_top_n_test", "1000"]
CELL_ANCHORS = ["--anchor_sizes", "8", "16", "32", "64", "128"]  # native-size cells
# Flags that differ between configurations; everything else is shared.
CONFIGS: dict[str, list[str]] = {
    # torchvision's MaskRCNN defaults throughout: its 800 px scaling and 2000 training proposals before NMS
    "stock": [*STOCK_HEADS, "--min_size", "800", "--max_size", "1333", "--max_upscale", "100",
              "--rpn_pre_nms_top_n_train", "2000"],
    "stock_native": STOCK_HEADS,  # torchvision's anchors and limits at native scale
    "cells": [*NATIVE, *CELL_ANCHORS],  # our detection limits at native scale (the defaults until cells_800 won)
    # CoNSeP's classes are in 44 / 59 / 82 / 25 % of its patches: t 0.5 repeats class-4 patches 1.41x and
    # class-1 patches 1.07x (t 0.3 would touch class 4 alone, 1.10x)
    "cells+repeat": [*NATIVE, *CELL_ANCHORS, "--repeat_thresh", "0.5"],
    # the rare-class and ranking levers of issues 27 and 24, each alone on the CPU protocol's configuration
    "cells+turns": [*NATIVE, *CELL_ANCHORS, "--transpose_p", "0.5"],
    "cells+hed": [*NATIVE, *CELL_ANCHORS, "--hed_p", "0.5"],
    "cells+balance": [*NATIVE, *CELL_ANCHORS, "--class_balance"],
    "cells+paste": [*NATIVE, *CELL_ANCHORS, "--copy_paste", "0.5", "--copy_paste_rare"],
    "cells+mask_iou": [*NATIVE, *CELL_ANCHORS, "--mask_iou"],
    "defaults+mask_iou": ["--mask_iou"],  # the CPM-15 protocol's configuration with a Mask Scoring head
    "cells+cascade": [*NATIVE, *CELL_ANCHORS, "--cascade"],
    "cells+mask_iou+cascade": [*NATIVE, *CELL_ANCHORS, "--mask_iou", "--cascade"],  # both ranking heads together
    "cells+context": [*NATIVE, *CELL_ANCHORS, "--context_roi", "2"],  # the box heads see each cell's surroundings
    "cells+type_map": [*NATIVE, *CELL_ANCHORS, "--type_map", "0.5"],  # a per-pixel cell-type map re-weighs the classes
    "defaults+cascade": ["--cascade"],  # the CPM-15 protocol's configuration with Cascade box stages
    "defaults+mask_iou+cascade": ["--mask_iou", "--cascade"],  # and with both ranking heads
    # the same trained on whole images (--crop 0), same steps
    "cells_whole": [*NATIVE, *CELL_ANCHORS, "--crop", "0"],
    # our detection limits at torchvision's scale (256 px crops become 800 px) with anchors to match;
    # on crops and tiles --input_scale 3.125 (the defaults until cells_x2 won), on whole images 800 px short sides
    "cells_800": [*NATIVE, "--min_size", "800", "--max_size", "1333", "--max_upscale", "100",
                  "--anchor_sizes", "32", "64", "128", "256", "512"],
    "defaults": [],  # --input_scale 2, anchors 16-256, 256 px crops: exactly cells_x2
    # one fixed factor for crops, tiles and whole images, anchors scaled with it (the defaults)
    "cells_x2": ["--input_scale", "2", "--anchor_sizes", "16", "32", "64", "128", "256"],
}
# Inference-time additions, scored on a run's final raw weights: predictor.Settings fields
# ("tile" is the training --crop, what inference.py does by default).
POST = ("tile", "tta", "tta_scales", "tile+tta", "tile+mask0.4", "tile+mask0.6", "tile+dihedral",
        "tile+tta+vote0.05", "tile+tta+vote0.1", "tile+tta+vote0.2", "tile+avg", "tile+tta+avg", "tile+dihedral+avg",
        "tile+tta+max", "tile+dihedral+max", "tile+oracle", "tile+trueclass", "tile+noiou", "tile+types",
        "tile+tta+types", "tile+dihedral+types")


def post_settings(name: str, crop: int) -> dict[str, Any]:
    """The ``predictor.Settings`` fields of one inference-time addition. Any of them may end in
    ``+mapW`` (a ``--type_map`` model's W replaced), then
    ``+consensus`` or ``+best`` (``--consensus``, ``--no_consensus``), then ``+ctxS`` or
    ``+ctxSrR`` (``--class_context S``, ``--class_context_reach R``), then ``+imgN`` (at most N
    detections an image) and ``+clsN`` (at most N an image and class)."""
    limits = {}
    for token, field in (("img", "detections_per_img"), ("cls", "detections_per_class")):
        head, _, last = name.rpartition("+")
        if head and last.startswith(token) and last[len(token):].isdigit():
            limits[field], name = int(last[len(token):]), head
    if limits:
        return {**post_settings(name, crop), **limits}
    head, _, last = name.rpartition("+")
    context = re.fullmatch(r"ctx(\d+(?:\.\d+)?)(?:r(\d*\.?\d+))?", last)
    if head and context:  # +ctxS or +ctxSrR: --class_context S (--class_context_reach R, > 0)
        strength, reach = float(context[1]), float(context[2] or Settings.context_reach)
        rest = post_settings(head, crop)
        if reach <= 0 or "class_context" in rest:
            raise ValueError(f"{name}: one +ctx, its reach above 0")
        return {**rest, "class_context": strength, "context_reach": reach}
    for token, on in (("+consensus", True), ("+best", False)):  # --consensus / --no_consensus
        if name.endswith(token):  # on one view they change nothing, unless the runs are an --ensemble
            rest = post_settings(name.removesuffix(token), crop)
            if "consensus" in rest:
                raise ValueError(f"{name}: one +consensus or +best")
            return {**rest, "consensus": on}
    tile = {"tile": crop, "tile_overlap": 0.25}
    flips = {"tta_scales": TTA_SCALES}  # inference.py --tta's views
    settings = {"tile": tile, "tta": flips, "tta_scales": {"tta_scales": (0.8, 1.0, 1.2)},
                "tile+tta": {**tile, **flips}, "tile+dihedral": {**tile, **flips, "dihedral": True},
                "tile+mask0.4": {**tile, "mask_thresh": 0.4}, "tile+mask0.6": {**tile, "mask_thresh": 0.6}}
    if name.startswith("tile+tta+vote"):
        return {**tile, **flips, "vote_boost": float(name.removeprefix("tile+tta+vote"))}
    for merge in ("avg", "max"):  # --merge (default: avg with TTA views); tile+avg averages an ensemble's models
        if name.endswith(f"+{merge}"):
            return {**settings[name.removesuffix(f"+{merge}")], "merge": merge}
    # predicted like the rest, then ranked or classed by the truth, or rescored by the cells' shape and stain
    for oracle in ("+oracle", "+trueclass", "+types"):
        if name.endswith(oracle):
            return settings[name.removesuffix(oracle)]
    if name.endswith("+noiou"):  # a --mask_iou model ranked by class probability alone
        return {**settings[name.removesuffix("+noiou")], "mask_scoring": False}
    head, _, last = name.rpartition("+")
    weight = re.fullmatch(r"map(\d*\.?\d+)", last)
    if head and weight and float(weight[1]) <= 1:  # +mapW: a --type_map model with W replaced
        return {**post_settings(head, crop), "type_weight": float(weight[1])}
    return settings[name]


def post_name(text: str) -> str:
    """argparse type of --post: a known variant, with optional +ctxS[rR], +imgN and +clsN."""
    try:
        post_settings(text, 256)
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown --post {text!r}; choose from {', '.join(POST)} "
                                          "(+mapW, +consensus or +best, +ctxS[rR], +imgN, +clsN optional)") from None
    return text


METRICS = ("segm_AP", "segm_AP50", "segm_AP75")
# AP50 at maxDets 1000, and per class (NaN where a class has no held-out cell) AP50 at maxDets 100 and
# 1000; F1 at IoU 0.5, over all classes and per class, of the cells scoring 0.5 and of the cells whose
# class evidence reaches 0.5 (``f1cell``: coco.scored_cells).
CLASS_METRICS = ("segm_AP50_1000", *(f"segm_AP50_class{c}" for c in range(1, NUM_CLASSES + 1)),
                 *(f"segm_AP50_class{c}_1000" for c in range(1, NUM_CLASSES + 1)),
                 "f1", *(f"f1_class{c}" for c in range(1, NUM_CLASSES + 1)),
                 "f1cell", *(f"f1cell_class{c}" for c in range(1, NUM_CLASSES + 1)))


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep_dir) if args.keep_dir else Path(tmp)
        for name in args.configs:
            for seed in args.seeds:
                start = time.time()
                out = root / f"{name}_{seed}"
                rows = train_once(args, CONFIGS[name], seed, out)
                rows.update(score_posts([out], args, name, with_ceiling="ceiling" not in runs))  # once: one split
                step = median_step_seconds(out)
                for label, row in rows.items():
                    row["seconds"] = round(time.time() - start, 1)
                    row["step_seconds"] = step  # the training's, beside every row of its weights
                    runs.setdefault(label, []).append(row)
                    print(f"{label} seed {seed}: " + ", ".join(f"{m} {row[m]:.4f}" for m in METRICS), flush=True)
                result = summarise(runs, args)  # after every run: hours of training survive a later crash
            if args.ensemble and len(args.seeds) > 1:
                rows = score_posts([root / f"{name}_{seed}" for seed in args.seeds], args, f"{name}+ensemble")
                for label, row in rows.items():
                    runs.setdefault(label, []).append(row)
                    print(f"{label}: " + ", ".join(f"{m} {row[m]:.4f}" for m in METRICS), flush=True)
                result = summarise(runs, args)
    print_table(result["mean"], result["std"], args)
    return result


def summarise(runs: dict[str, list[dict]], args: argparse.Namespace) -> dict:
    """Mean and spread over seeds of every row so far, written to ``--json``."""
    table = {name: {m: statistics.mean(r[m] for r in rows) for m in _keys(rows)} for name, rows in runs.items()}
    spread = {name: {m: statistics.pstdev(r[m] for r in rows) for m in _keys(rows)} for name, rows in runs.items()}
    result = {"settings": vars(args), "mean": table, "std": spread, "runs": runs}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def _keys(rows: list[dict]) -> list[str]:
    """The metrics every run of a row has, finite (training rows lack the maxDets 1000 ones; a
    class without held-out cells has no AP)."""
    return [m for m in (*METRICS, *CLASS_METRICS) if all(m in r and math.isfinite(r[m]) for r in rows)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--train_dir", default=str(ROOT.parent / "shared/data/cpm15_hw3/train"),
                        help="training folder (default: ../shared/data/cpm15_hw3/train beside the repository)")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["stock_native", "cells"])
    parser.add_argument("--post", nargs="*", type=post_name, default=[], metavar="POST",
                        help=f"inference-time additions scored on each run's final weights: {', '.join(POST)}, "
                             "each optionally +imgN (detections an image) and then +clsN (an image and class)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--ensemble", action="store_true",
                        help="also score each configuration's runs of all --seeds as one checkpoint ensemble "
                             "(inference.py --checkpoint A B), under every --post variant")
    parser.add_argument("--split_seed", type=int, default=0, help="one held-out split for every run")
    parser.add_argument("--val_split", type=float, default=0.3,
                        help="held-out share (3 of 10 CPM-15 images; of groups with --split_groups)")
    parser.add_argument("--split_groups", default=None, metavar="MANIFEST_OR_REGEX",
                        help="hold out whole groups (the train scripts' flag): CoNSeP's manifest.json, whose "
                             "patches of one source image overlap")
    parser.add_argument("--val_dir", default=None,
                        help="score on this folder (training layout); --train_dir then trains whole")
    parser.add_argument("--backbone", choices=("resnet", "effnet"), default="resnet")
    parser.add_argument("--weights", default="none",
                        help="backbone init of every run (default: none, random; imagenet where it can be downloaded)")
    parser.add_argument("--epochs", type=int, default=30, help="equal budget for every configuration")
    parser.add_argument("--crop", type=int, default=256, help="CPU-sized training windows")
    parser.add_argument("--ema_decay", type=float, default=0.98, help="the EMA scored beside every run (0: none)")
    parser.add_argument("--eval_max_dets", type=int, default=100,
                        help="COCOeval maxDets of the training rows (the --post rows and the ceiling are scored at "
                             "100, plain keys, and at 1000, keys ending in _1000)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to every run")
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/accuracy.json"),
                        help="results, rewritten after every run")
    parser.add_argument("--keep_dir", default=None,
                        help="keep each run in DIR/<config>_<seed> (default: a temporary folder); a finished run "
                             "there with the same flags is scored again, not retrained; a stopped one (killed, Ctrl-C) "
                             "of the same data and model is continued from its last.pth, and a stopped scoring from the "
                             "held-out images it predicted (held-out-*.partial beside the run)")
    return parser


def train_once(args: argparse.Namespace, flags: list[str], seed: int, out: Path) -> dict[str, dict]:
    """Train one configuration; the held-out metrics of its last epoch, raw and EMA."""
    backbone = "resnet101" if args.backbone == "resnet" else "effnet_v2_m"
    argv = ["--train_dir", args.train_dir, "--output_dir", str(out), "--weights", args.weights,
            "--epochs", str(args.epochs), "--eval_every", str(args.epochs), "--crop", str(args.crop),
            "--warmup_epochs", "1", "--use_cosine", "--lr", "4e-4", "--val_split", str(args.val_split),
            "--split_seed", str(args.split_seed), "--seed", str(seed), "--num_workers", "0",
            "--ema_decay", str(args.ema_decay), "--eval_max_dets", str(args.eval_max_dets), "--tile", "0",
            *(["--split_groups", args.split_groups] if args.split_groups else []),
            *(["--val_dir", args.val_dir] if args.val_dir else []), *flags, *args.extra]
    parser = training.build_parser(backbone, "")
    state = run_state(out, vars(parser.parse_args(argv)), parser)
    if state == "finished":
        print(f"{out}: a finished run with these flags, scored again without training", flush=True)
    else:
        if state == "stopped":
            print(f"{out}: a stopped run of the same data and model, continued from its last.pth", flush=True)
            argv = ["--resume", str(out / "last.pth"), *argv]
        (train_resnet if backbone == "resnet101" else train_effnet_v2).main(argv)
    last = json.loads((out / "history.json").read_text())[-1]
    name = out.name.rsplit("_", 1)[0]
    rows = {name: _history_metrics(last, "")}
    if args.ema_decay > 0:
        rows[f"{name}+ema"] = _history_metrics(last, "ema_")
    return rows


def median_step_seconds(out: Path) -> float | None:
    """The run's training step in seconds, the median over its epochs: one slow epoch (a
    machine shared for a while) does not move it."""
    steps = [row["step_seconds"] for row in json.loads((out / "history.json").read_text()) if row.get("step_seconds")]
    return round(statistics.median(steps), 3) if steps else None


def _history_metrics(row: dict, prefix: str) -> dict[str, float]:
    """A history row's metrics (``prefix`` "ema_" for the average's); null is a class without cells."""
    return {m: float("nan") if row[prefix + m] is None else float(row[prefix + m])
            for m in (*METRICS, *CLASS_METRICS) if prefix + m in row}


def run_state(out: Path, args: dict[str, Any], parser: argparse.ArgumentParser) -> Literal["new", "stopped", "finished"]:
    """What ``out`` holds: "new" (nothing, or a stopped run with other data or model flags, which
    a fresh run moves aside), "stopped" (short of its last epoch: continued, so a benchmark
    killed with its session loses at most the epoch under way) or "finished" (its last epoch,
    or stopped early by ``--early_stop``).

    A stopped run continues wherever ``--resume`` would take it: the same data and model, two
    spellings of one folder alike, the memory limits and invocation flags free (the
    out-of-memory advice is a flag after ``--extra`` and the same run). A finished run is scored
    only with exactly ``args``: one with other flags is never trained over (hours lost to a
    changed default), and the error names them. A flag the train scripts gained after the run
    counts as equal at its default: it changed nothing."""
    if not (out / "last.pth").is_file():
        return "new"
    state = load_checkpoint(out / "last.pth")
    where = ("resume", "output_dir")  # how the run was reached and where it lies, not what it trained
    saved = {k: v for k, v in saved_args(state).items() if k not in where}
    expected = {k: v for k, v in args.items() if k not in where and (k in saved or v != parser.get_default(k))}
    epoch, patience = state.get("epoch") or 0, saved.get("early_stop") or 0
    early = patience > 0 and epoch - (state.get("best_epoch") or 0) >= patience
    if not state.get("partial") and (epoch == saved.get("epochs") or early):
        if saved == expected:
            return "finished"
        differ = sorted(k for k in {*saved, *expected} if saved.get(k) != expected.get(k))
        raise UsageError(f"{out}: a finished run trained with other flags ("
                         + ", ".join(f"--{k} {saved.get(k)} there, {expected.get(k)} here" for k in differ)
                         + "); pass its values after --extra to score it again, or another --keep_dir to train anew.")
    free = {*training.INVOCATION_FLAGS, *training.RESUME_LIMITS}  # what --resume lets differ
    same = all(training.same_flag(saved.get(k), expected.get(k)) for k in {*saved, *expected} - free)
    return "stopped" if same else "new"


def prediction_key(settings: Settings, n_models: int) -> Settings:
    """What ``predict`` must be run with for ``settings``: variants with the same key share one
    prediction. ``+ctx`` rescoring is applied afterwards, and with one model and one view there
    is one source, so ``+consensus`` and ``+best`` predict the same (``predictor._candidates``
    averages over sources only when there are several: a cell's tile copies share one)."""
    key = replace(settings, class_context=0.0, context_reach=Settings.context_reach)
    return replace(key, consensus=None) if n_models == 1 and settings.tta_scales is None else key


def score_posts(outs: list[Path], args: argparse.Namespace, name: str,
                with_ceiling: bool = False) -> dict[str, dict[str, float]]:
    """Held-out metrics of the final raw weights of the runs ``outs`` (one run, or several as an
    ensemble) under each ``--post`` variant, and the split's ``ceiling`` if asked; the held-out
    labels and the models are loaded once for all of them. Every run shares the split
    (``--split_seed``)."""
    if not args.post:
        return {}
    split = json.loads((outs[0] / "split.json").read_text())
    samples = list_samples(Path(split.get("val_dir") or args.train_dir))
    ids = {p.name: i + 1 for i, p in enumerate(samples)}  # the ids training validated with
    val = [p for p in samples if p.name in set(split["val"])]
    dataset = LabelledImages(val, [ids[p.name] for p in val], desc="held-out labels")
    coco_gt = build_coco_gt(dataset.instances, dataset.image_ids)
    models = [load_model(out / "last.pth")[0] for out in outs]
    rows = {"ceiling": ceiling(coco_gt)} if with_ceiling else {}
    predicted: dict[Settings, tuple[list[dict], float]] = {}  # variants differing only in scoring share one
    classes = class_count(models)
    typer = None
    for post in args.post:
        settings = Settings(**post_settings(post, args.crop))
        plain = prediction_key(settings, len(models))
        if plain not in predicted:
            predicted[plain] = held_out_predictions(models, outs, dataset, plain, desc=f"held-out {post}")
        results, seconds = predicted[plain]
        if settings.class_context:  # what predict would return with it: the same rescoring of the merged cells
            start = time.time()
            results = context_rescored(results, settings, classes)
            seconds += (time.time() - start) / max(len(dataset), 1)  # the row's time includes its rescoring
        if "+oracle" in post:
            results = truth_ranked(coco_gt, results)
        if "+trueclass" in post:
            results = truth_classed(coco_gt, results)
        if "+types" in post:
            start = time.time()
            if typer is None:
                if "train" not in split:
                    raise UsageError(f"{outs[0] / 'split.json'}: no training list; +types needs a run that "
                                     "trained with this code")
                trained = set(split["train"])  # from --train_dir, also where --val_dir held out another folder
                typer = fitted_cell_types([p for p in list_samples(Path(args.train_dir)) if p.name in trained],
                                          dataset, classes)
            results = types_rescored(results, typer, dataset)
            seconds += (time.time() - start) / max(len(dataset), 1)
        rows[f"{name}+{post}"] = {**_scored(coco_gt, results), "seconds_per_image": round(seconds, 3)}
    return rows


def held_out_predictions(models: list, outs: list[Path], dataset: LabelledImages, settings: Settings,
                         desc: str) -> tuple[list[dict], float]:
    """COCO results of the held-out images, recorded image by image beside the (first) run
    (``journal.PredictionJournal``): eight views of a hundred patches take hours on a CPU, and
    the same command after a kill predicts only the images left. The record is deleted once all
    are predicted. Seconds per image count the images this call predicted (0 where none were)."""
    key = run_key([out / "last.pth" for out in outs], settings=settings.what_it_predicts(),
                  images=[int(i) for i in dataset.image_ids])
    journal = PredictionJournal(outs[0] / f"held-out-{key[:16]}{JOURNAL_SUFFIX}", key)
    results = [r for part in journal.replay(set(journal.done)) for r in part]
    todo = [i for i, image_id in enumerate(dataset.image_ids) if int(image_id) not in journal.done]
    if journal.done:
        print(f"{journal.path}: {len(journal.done)} of {len(dataset)} held-out images predicted by an earlier run, "
              "kept", flush=True)
    loader = DataLoader(Subset(dataset, todo), batch_size=1, collate_fn=collate_fn)
    start = time.time()
    with journal:
        for image_id, found in predict_each(models, loader, torch.device("cpu"), settings, desc=desc):
            journal.add(image_id, found)
            journal.finish(image_id)
            results.extend(found)
    seconds = (time.time() - start) / len(todo) if todo else 0.0
    journal.discard()
    return results, seconds


def _cell_features(dataset: LabelledImages) -> tuple[torch.Tensor, torch.Tensor]:
    """``cell_types.cell_features`` of every true cell of ``dataset``, and their 0-based classes."""
    features, labels = [], []
    for i in range(len(dataset)):
        image, inst = dataset.raw(i)
        features.append(cell_features(image, torch.from_numpy(inst.masks()).bool()))
        labels.append(torch.from_numpy(inst.labels) - 1)
    return torch.cat(features), torch.cat(labels)


def fitted_cell_types(train: list[Path], held_out: LabelledImages, classes: int) -> CellTypeClassifier:
    """The cell-type classifier fitted on the true cells of the training samples ``train``;
    its accuracy per class on the held-out true cells is printed (how good the second opinion
    is on its own)."""
    features, labels = _cell_features(LabelledImages(train, range(1, len(train) + 1), desc="training cells"))
    typer = CellTypeClassifier(classes)
    loss = typer.fit(features, labels)
    test, truth = _cell_features(held_out)
    with torch.no_grad():
        guessed = typer(test).argmax(1)
    recall = [f"{float((guessed[truth == c] == c).float().mean()):.3f}" if (truth == c).any() else "-"
              for c in range(classes)]
    print(f"cell types: {len(labels)} training cells, loss {loss:.3f}; held-out accuracy "
          f"{float((guessed == truth).float().mean()):.3f}, recall per class {' / '.join(recall)}", flush=True)
    return typer


def types_rescored(results: list[dict], typer: CellTypeClassifier, dataset: LabelledImages) -> list[dict]:
    """COCO results with each score times the cell-type classifier's probability of its class,
    measured on its mask (``cell_types.rescored``)."""
    position = {image_id: i for i, image_id in enumerate(dataset.image_ids)}
    out = []
    for image_id, dets in _by_image(results).items():
        image, _ = dataset.raw(position[image_id])
        masks = torch.from_numpy(mask_util.decode([d["segmentation"] for d in dets])).permute(2, 0, 1).bool()
        with torch.no_grad():
            probs = typer(cell_features(image, masks))
        scores = rescored(torch.tensor([d["score"] for d in dets]), torch.tensor([d["category_id"] for d in dets]),
                          probs)
        out.extend({**d, "score": float(s)} for d, s in zip(dets, scores))
    return out


def context_rescored(results: list[dict], settings: Settings, classes: int) -> list[dict]:
    """COCO results rescored by their neighbours' classes (``class_context.rescore``, of
    ``classes`` classes) as ``predict`` would with ``settings.class_context``, from the same
    detections, image by image."""
    rescored = []
    for dets in _by_image(results).values():
        xywh = torch.tensor([d["bbox"] for d in dets], dtype=torch.float32)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        labels = torch.tensor([d["category_id"] for d in dets])
        scores = rescore(boxes, labels, torch.tensor([d["score"] for d in dets]), classes,
                         settings.class_context, settings.context_reach)
        rescored.extend({**d, "score": float(s)} for d, s in zip(dets, scores.tolist()))
    return rescored


def _scored(coco_gt: COCO, results: list[dict]) -> dict[str, float]:
    """The table's metrics of a submission, at maxDets 100 and 1000 (``scoring.score``)."""
    metrics = score(coco_gt, results)
    metrics.update({k.replace("f1", "f1cell"): v for k, v in matching_metrics(coco_gt, results, cells=True).items()
                    if k.startswith("f1")})
    return {m: float(metrics[m]) for m in (*METRICS, *CLASS_METRICS)}


def ceiling(coco_gt: COCO) -> dict[str, float]:
    """The held-out metrics of the ground truth itself submitted as predictions: the most any
    model can score when only 100 (or 1000) detections per image and class count."""
    truth = [{key: ann[key] for key in ("image_id", "category_id", "segmentation", "bbox")} | {"score": 1.0}
             for ann in coco_gt.dataset["annotations"]]
    return _scored(coco_gt, truth)


def truth_ranked(coco_gt: COCO, results: list[dict]) -> list[dict]:
    """The detections scored by their best mask IoU with a ground-truth cell of their class: the
    most any re-scoring of these very detections can reach (an upper bound, not a method)."""
    ranked = []
    for dets, truth, iou in _truth_ious(coco_gt, results):
        if not truth:
            ranked.extend({**d, "score": 0.0} for d in dets)
            continue
        same = np.array([d["category_id"] for d in dets])[:, None] == np.array([t["category_id"] for t in truth])[None]
        ranked.extend({**d, "score": float(best)} for d, best in zip(dets, (iou * same).max(axis=1)))
    return ranked


def truth_classed(coco_gt: COCO, results: list[dict], iou_thresh: float = 0.5) -> list[dict]:
    """The detections relabelled with the class of the true cell they overlap best, where that
    mask IoU reaches ``iou_thresh`` (the others keep theirs), scores unchanged: what perfect
    classification of these very detections would score, so the gap to it is what the
    classifier loses (an upper bound, not a method)."""
    classed = []
    for dets, truth, iou in _truth_ious(coco_gt, results):
        if not truth:
            classed.extend(dets)
            continue
        best = iou.argmax(axis=1)
        classed.extend({**d, "category_id": int(truth[b]["category_id"])} if iou[k, b] >= iou_thresh else d
                       for k, (d, b) in enumerate(zip(dets, best)))
    return classed


def _truth_ious(coco_gt: COCO, results: list[dict]) -> Iterator[tuple[list[dict], list[dict], np.ndarray]]:
    """Per image: its detections, its true cells and their mask IoUs [detections, cells]."""
    for image_id, dets in _by_image(results).items():
        truth = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id]))
        iou = (np.asarray(mask_util.iou([d["segmentation"] for d in dets], [t["segmentation"] for t in truth],
                                        [0] * len(truth))).reshape(len(dets), len(truth))
               if truth else np.zeros((len(dets), 0)))
        yield dets, truth, iou


def _by_image(results: list[dict]) -> dict[int, list[dict]]:
    """COCO results grouped by their image, in their order."""
    grouped: dict[int, list[dict]] = {}
    for r in results:
        grouped.setdefault(r["image_id"], []).append(r)
    return grouped


def print_table(table: dict[str, dict[str, float]], spread: dict[str, dict[str, float]],
                args: argparse.Namespace) -> None:
    print(f"\nheld-out segm metrics, last epoch, mean ± std of seeds {args.seeds} "
          f"({args.epochs} epochs, crop {args.crop})")
    width = max(len("configuration"), *map(len, table)) + 2  # a long post variant's name never runs into its numbers
    print(f"{'configuration':<{width}}" + "".join(f"{m:>20}" for m in METRICS))
    for name, row in table.items():
        print(f"{name:<{width}}" + "".join(f"{row[m]:>12.4f} ± {spread[name][m]:.4f}" for m in METRICS))
    classes = range(1, NUM_CLASSES + 1)
    print("\nper class, mean of seeds: segm AP50 at maxDets 100 | at 1000 | F1 at IoU 0.5 | F1 of summed class evidence")
    for name, row in table.items():
        cells = [[row.get(key.format(c), float("nan")) for c in classes]
                 for key in ("segm_AP50_class{}", "segm_AP50_class{}_1000", "f1_class{}", "f1cell_class{}")]
        print(f"{name:<{width}}" + " | ".join(" ".join(f"{v:.3f}" for v in part) for part in cells))


if __name__ == "__main__":
    run_cli(main)
