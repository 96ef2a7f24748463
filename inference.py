"""The command line from a checkpoint and a test folder to a submission: reads the images
and id map, predicts them (``predictor.py``) and writes the COCO results, and label images
on request. The model is rebuilt from the checkpoint's config, so no architecture flag is
needed:
    python inference.py --checkpoint outputs/resnet101/best.pth
"""
from __future__ import annotations

import argparse
import functools
import inspect
import json
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from argtypes import LABEL_THRESH, HelpFormatter, add_label_rule_arg, by_evidence, chance, non_negative_int
from cell_outputs import CellWriter, check_sample_names, painted_images, painted_window, report_cell_outputs
from checkpoint import load_model, saved_args
from cli import run_cli
from coco import detections_to_coco
from dataloader import UnlabelledImages, collate_fn, find_id_map, image_size, map_beside
from devices import default_device
from errors import DeviceMemoryError, UsageError
from files import JsonArrayWriter, writable_dir, writable_file, write_json
from flags import (add_checkpoint_arg, add_checkpoint_checks, add_class_names_arg, add_id_map_arg, add_prediction_args,
                   checkpoint_overrides, class_names_for, prediction_settings)
from journal import SUFFIX as JOURNAL_SUFFIX
from journal import PredictionJournal, file_stamp, run_key
from predictor import Settings, image_batches, limits, predict_each
from progress import progress
from streaming import LazyImage, model_predictor, stream_image, window_count, window_spans


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_checkpoint_arg(parser)
    parser.add_argument("--test_dir", default="dataset/test_release",
                        help="folder of the images to predict: TIFF, PNG or JPEG; grey, RGB or RGBA; 8 or 16 bit")
    add_id_map_arg(parser)
    parser.add_argument("--output_dir", default=None,
                        help="folder of the submission, <output_dir>/test-results.json (default: the checkpoint's)")
    parser.add_argument("--output", default=None, help="exact submission path, instead of --output_dir")
    parser.add_argument("--num_workers", type=non_negative_int, default=2, help="image-decoding worker processes")
    parser.add_argument("--window", type=non_negative_int, default=4096,
                        help="an image with a side longer than this is streamed: read lazily (tiled or compressed "
                             "TIFF: only the parts needed; a PNG or JPEG is decoded whole) and predicted in overlapping "
                             "windows of this side, its cells written window by window, so beyond a PNG's or "
                             "JPEG's pixels memory depends on the window, not the image. A "
                             "streamed image keeps every cell; --detections_per_img and --detections_per_class, "
                             "when given, cap each window. Its cells are numbered best first within each window, "
                             "on from the previous window's (0: never stream)")
    parser.add_argument("--score_thresh", type=chance, default=0.0,
                        help="drop detections below this score (0 keeps all: AP rewards low-score hits)")
    outputs = parser.add_argument_group("per-cell outputs (cells numbered 1 = best score in each image, or "
                                        "window by window in a streamed one, see --window; a pixel covered "
                                        "twice belongs to the better score)")
    outputs.add_argument("--save_labels", default=None, metavar="DIR",
                         help="DIR/<image stem>/image.tif + class1.tif..class4.tif (uint16 cell numbers; uint32 in a "
                              "streamed image or past 65535 cells): the "
                              "training layout, to correct and train on, or to open in napari")
    outputs.add_argument("--save_geojson", default=None, metavar="DIR",
                         help="DIR/<image stem>.geojson: QuPath detections (polygons in image pixels, class, score)")
    outputs.add_argument("--save_csv", default=None, metavar="FILE",
                         help="one row per cell: image, cell, class, score, area, perimeter, centroid, box, "
                              "eccentricity, mean intensity per channel")
    outputs.add_argument("--label_thresh", type=chance, default=LABEL_THRESH,
                         help="lowest score of a cell in these outputs")
    add_label_rule_arg(outputs, "which cells these outputs keep (the submission is the same either way).",
                       "--label_thresh", tail=", so a cell the model is sure of but cannot type (0.45 one class, "
                                             "0.4 another) is kept")
    add_class_names_arg(outputs)
    add_prediction_args(parser)
    add_checkpoint_checks(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output and args.output_dir:
        parser.error("--output and --output_dir both name where the submission goes; pass one of them")
    for flag in ("save_labels", "save_geojson"):  # checked before minutes of prediction
        if getattr(args, flag):
            writable_dir(getattr(args, flag), f"--{flag}")
    for flag, path, name in (("--output", args.output, "test-results.json"), ("--save_csv", args.save_csv, "cells.csv")):
        if path:
            writable_file(path, flag, name)
    overrides = checkpoint_overrides(args)
    if args.output_dir:
        writable_dir(args.output_dir, "--output_dir")
    folder = Path(args.output_dir or Path(args.checkpoint[0]).parent)
    output = Path(args.output) if args.output else folder / "test-results.json"
    return predict_folder(args.checkpoint, args.test_dir, args.id_map_json, output, prediction_settings(args),
                          device=args.device, overrides=overrides, score_thresh=args.score_thresh,
                          num_workers=args.num_workers,
                          cell_outputs=CellOutputs(args.save_labels, args.save_geojson, args.save_csv, args.label_thresh,
                                                   args.class_names, by_evidence(args.label_rule)),
                          window=args.window)


class CellOutputs(NamedTuple):
    """The per-cell outputs asked for (``cell_outputs.py``): folders and file, lowest score, names."""

    labels: str | None = None
    geojson: str | None = None
    csv: str | None = None
    score_thresh: float = LABEL_THRESH
    class_names: list[str] | None = None  # None: the checkpoint's run's, else class1, class2, ... (class_names_for)
    evidence: bool = by_evidence(None)  # keep the cells whose summed class scores reach score_thresh

    @property
    def requested(self) -> bool:
        return any(self.paths)

    @property
    def paths(self) -> tuple[Path | None, Path | None, Path | None]:
        return tuple(Path(p) if p else None for p in (self.labels, self.geojson, self.csv))


def _out_of_memory_in_one_line(predict: Callable[..., Path]) -> Callable[..., Path]:
    """Out of memory while predicting a folder becomes one line naming the flags that shrink
    prediction (in inference.py, and for the test folder a training run predicts at its end)."""
    @functools.wraps(predict)
    def wrapper(*args: Any, **kwargs: Any) -> Path:
        try:
            return predict(*args, **kwargs)
        except torch.OutOfMemoryError as err:  # the fix is a flag, not a kernel's traceback
            test_dir = inspect.signature(predict).bind(*args, **kwargs).arguments["test_dir"]
            raise DeviceMemoryError(f"{test_dir}: out of memory predicting; pass --batch_size 1 or --use_amp, which "
                                    "keep the images already predicted, else a smaller --tile or --max_size, no --tta, "
                                    "or a smaller --window (large images predicted in windows), which predict every "
                                    "image anew.") from err
    return wrapper


@_out_of_memory_in_one_line
def predict_folder(checkpoint: str | Path | Sequence[str | Path], test_dir: str | Path, id_map_json: str | Path | None,
                   output: Path, settings: Settings = Settings(tile=None, batch_size=None), device: str | None = None,
                   overrides: dict[str, Any] | None = None, score_thresh: float = 0.0, num_workers: int = 0,
                   cell_outputs: CellOutputs = CellOutputs(), window: int = 0) -> Path:
    """Predict every test image and write the submission; returns its path. Several
    checkpoints are an ensemble; ``settings.tile`` None tiles at the run's tile recorded
    in the (first) checkpoint, ``settings.batch_size`` None takes the device's default.
    ``id_map_json`` None: the map beside the folder, else the images numbered by name (and that
    map written beside the submission). An image with a side over ``window`` (> 0) is streamed
    (``streaming.py``); the others are predicted whole, their results written first. Each finished
    image is recorded in ``<output>.partial`` (``journal.py``): the same call after a crash
    predicts only the images still missing."""
    id_map = find_id_map(Path(test_dir), id_map_json)
    dataset = UnlabelledImages(Path(test_dir), id_map)  # fails on a bad id map before the model loads
    if id_map is None:
        check_numbered_map(map_beside(output), dataset.entries)
    if cell_outputs.labels or cell_outputs.geojson:
        check_sample_names([e["file_name"] for e in dataset.entries])
    sizes = [image_size(dataset.test_dir / e["file_name"]) for e in dataset.entries]
    streamed = [i for i, size in enumerate(sizes) if window and max(size) > window]
    whole = sorted(set(range(len(sizes))) - set(streamed))
    torch_device = default_device(device)
    paths = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    loaded = [load_model(Path(path), overrides) for path in paths]
    models = [model.to(torch_device) for model, _, _ in loaded]
    resolved = settings.resolved(torch_device, loaded[0][2])
    if settings.tile is None and resolved.tile:
        print(f"tiles of {resolved.tile} px, the tile the checkpoint's run validated with (--tile 0 predicts whole "
              "images)")
    if streamed:  # checked before minutes of prediction
        window_spans(window + 1, window, resolved.tile, resolved.tile_overlap)
    per_window = replace(resolved, detections_per_img=settings.detections_per_img or 0,
                         detections_per_class=settings.detections_per_class or 0)
    journal = PredictionJournal(Path(f"{output}{JOURNAL_SUFFIX}"), run_key(
        paths, test_dir=Path(test_dir).resolve(),
        settings=resolved.what_it_predicts(), per_window=per_window.what_it_predicts(), window=window,
        score_thresh=score_thresh, overrides=overrides))
    ids = [int(e["id"]) for e in dataset.entries]
    stamps = {int(e["id"]): image_stamp(dataset.test_dir, e) for e in dataset.entries}
    earlier = {i for i in whole if journal.finished(ids[i], stamps[ids[i]])}
    if not cell_outputs.requested:  # a streamed image's cell outputs are painted window by window as it is predicted
        earlier |= {i for i in streamed if journal.finished(ids[i], stamps[ids[i]])}
    if journal.stale:
        print(f"{journal.path}: a partial run with other checkpoints or settings; starting over")
    elif earlier:
        print(f"resuming: {len(earlier)} of {len(dataset)} images were predicted by an earlier run of this command "
              f"({journal.path}; delete it to start over)")
    todo = [i for i in whole if i not in earlier]
    batches = image_batches([sizes[i] for i in todo], resolved, settings.batch_size is not None)
    loader = DataLoader(Subset(dataset, todo), batch_sampler=batches, collate_fn=collate_fn, num_workers=num_workers,
                        pin_memory=torch_device.type == "cuda")
    names = class_names_for(cell_outputs.class_names, saved_args(loaded[0][2]).get("class_names"),
                            loaded[0][1]["num_classes"])
    start = time.time()
    with ExitStack() as stack:
        stack.enter_context(journal)
        submission = stack.enter_context(JsonArrayWriter(Path(output)))
        writer = (stack.enter_context(CellWriter(names, *cell_outputs.paths)) if cell_outputs.requested else None)
        if whole:
            results = [r for part in journal.replay({ids[i] for i in whole if i in earlier}) for r in part]
            for image_id, found in predict_each(models, loader, torch_device, resolved, desc="inference"):
                journal.add(image_id, found)
                journal.finish(image_id, stamps[image_id])
                results.extend(found)
            report_caps(results, *limits(models, resolved))
            results = [r for r in results if r["score"] >= score_thresh]
            submission.extend(results)
            if writer:
                for image in painted_images(results, dataset.test_dir, [dataset.entries[i] for i in whole],
                                            cell_outputs.score_thresh, cell_outputs.evidence):
                    writer.add(image)
            del results
        for part in journal.replay({ids[i] for i in streamed if i in earlier}):  # one pass over the record
            submission.extend(part)
        for i in streamed:
            if i in earlier:
                continue
            _stream(dataset.entries[i], dataset.test_dir, models, torch_device, per_window, window, score_thresh,
                    submission, writer, cell_outputs.score_thresh, journal, cell_outputs.evidence, stamps[ids[i]])
    journal.discard()  # the submission is complete
    if id_map is None:  # the ids the submission uses, for evaluate.py and for the user
        write_json(map_beside(output), dataset.entries, indent=1)
        print(f"no id map: {len(dataset)} images numbered by file name -> {map_beside(output)}")
    if writer:
        report_cell_outputs(len(dataset), cell_outputs.score_thresh, *cell_outputs.paths)
    seconds = time.time() - start
    print(f"{submission.count} detections on {len(dataset)} images in {seconds:.1f}s "
          f"({seconds / max(len(dataset), 1):.2f}s/image) -> {output}")
    return Path(output)


def check_numbered_map(path: Path, entries: list[dict]) -> None:
    """Refuse, before any prediction, to write the numbered id map over a map of other images
    (the task's own, when ``--output_dir`` is the dataset folder); the same numbering is a rerun."""
    try:
        same = not path.exists() or json.loads(path.read_text(encoding="utf-8")) == entries
    except (ValueError, OSError):
        same = False
    if not same:
        raise UsageError(f"{path}: an id map of other images is there, and numbering this folder's images would "
                         "overwrite it; pass another --output_dir or --output, or delete the file if an earlier "
                         "inference.py run wrote it.")


def report_caps(results: list[dict], cap: int, per_class: int) -> None:
    """A note where images reached a detection cap: cells past it were dropped, which a
    submission scored at maxDets 100 does not miss, but a cell count does."""
    per_image = Counter(r["image_id"] for r in results)
    per_cell_class = Counter((r["image_id"], r["category_id"]) for r in results)
    full = sum(n >= cap for n in per_image.values())
    full_class = len({image for (image, _), n in per_cell_class.items() if per_class and n >= per_class})
    if full:
        print(f"note: {full} image(s) reached --detections_per_img {cap}; pass --detections_per_img 0 to keep "
              "every cell (for counting cells)")
    if full_class:
        print(f"note: {full_class} image(s) reached --detections_per_class {per_class} in some class (the "
              "scorer counts 100 per image and class); pass --detections_per_class 0 to keep every cell")


def _stream(entry: dict, test_dir: Path, models: list[nn.Module], device: torch.device, settings: Settings,
            window: int, score_thresh: float, submission: JsonArrayWriter, writer: CellWriter | None,
            label_thresh: float, journal: PredictionJournal, evidence: bool, stamp: list) -> None:
    """One large image predicted window by window, each window's cells written before the next
    is read; finished in the journal with ``stamp``, taken before it was read."""
    path = test_dir / entry["file_name"]
    with LazyImage(path) as image:
        if image.size[0] * image.size[1] >= 1 << 32:
            raise UsageError(f"{path}: {image.size[0]}x{image.size[1]} px is more than COCO RLE can describe (2^32 "
                             "pixels); predict regions of it, each a file of its own.")
        windows = window_count(image.size, window, settings.tile, settings.tile_overlap)
        print(f"{entry['file_name']}: {image.size[0]}x{image.size[1]} px, streamed in {windows} windows "
              f"(--window {window})")
        numbered = 0
        parts = stream_image(image, model_predictor(models, device, settings, image), window, settings.tile,
                             settings.tile_overlap)
        for part in progress(parts, entry["file_name"], total=windows):
            kept = [r for r in detections_to_coco(part.cells(image.size), int(entry["id"])) if r["score"] >= score_thresh]
            submission.extend(kept)
            journal.add(int(entry["id"]), kept)
            if writer:  # the per-cell outputs hold cells the submission holds
                cells = painted_window(entry["file_name"], int(entry["id"]), path, part.pixels, part.origin, part.dets,
                                       part.core.numpy(), label_thresh, numbered + 1, evidence, score_thresh)
                writer.add(cells, image.size)
                numbered += len(cells.cells)
    journal.finish(int(entry["id"]), stamp)


def image_stamp(test_dir: Path, entry: dict) -> list:
    """What the journal records a finished image with: its name and its file's size and time,
    so an image replaced under its name, or an id given to another file, is predicted again."""
    return [entry["file_name"], *file_stamp(Path(test_dir) / entry["file_name"])]


if __name__ == "__main__":
    run_cli(main, on_interrupt="run the same command again: the images already predicted are kept (a streamed "
                               "image with --save_* outputs is predicted again)")
