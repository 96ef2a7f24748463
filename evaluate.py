"""Score a submission, or label images, against a dataset folder in the training layout: as a
leaderboard does (COCO AP at maxDets 100, and at 1000 where hundreds of cells fill an image)
and as the cell community does (F1, precision, recall, panoptic quality at IoU 0.5).

    python inference.py --checkpoint outputs/resnet101/best.pth --test_dir dataset/val --output val-results.json
    python evaluate.py --data_dir dataset/val --submission val-results.json --json metrics.json
    python evaluate.py --data_dir dataset/val --labels outputs/resnet101/labels

Image ids come from ``--id_map_json`` (a sample folder ``X`` is the entry with file name
``X.tif`` or ``X/image.tif``), or else from the sorted sample names, 1 to N, as training and
``inference.py`` (on a folder in the training layout) number them.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from argtypes import LABEL_THRESH, HelpFormatter, add_label_rule_arg, by_evidence, chance, overlap
from cli import run_cli
from files import writable_file, write_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data_dir", required=True, help="ground truth: folder of <sample>/image.tif + classN.tif")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--submission", help="COCO results JSON (what inference.py writes)")
    source.add_argument("--labels", help="folder of <sample>/classN.tif label images (inference.py --save_labels)")
    parser.add_argument("--id_map_json", default=None,
                        help="{file_name, id} list naming the ids the submission uses (default: sorted samples, 1..N)")
    threshold = parser.add_mutually_exclusive_group()
    threshold.add_argument("--score_thresh", type=chance, default=None,
                           help="F1/PQ: the score a submitted cell needs to count as found, by --label_rule "
                                f"(default {LABEL_THRESH}; every cell of --labels counts)")
    threshold.add_argument("--label_thresh", type=chance, default=None,
                           help="the same threshold by inference.py's name for it: pass its --label_thresh to score "
                                "the cells it wrote (its --score_thresh is another threshold)")
    add_label_rule_arg(parser, "F1/PQ of a --submission: which cells count as found, as inference.py "
                               "--label_rule keeps them.", "--score_thresh")
    parser.add_argument("--iou_thresh", type=overlap, default=0.5, help="F1/PQ: IoU of a match")
    parser.add_argument("--json", default=None, help="write the metrics here as one flat JSON object")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.labels:  # a threshold the label images were already cut at: ignoring it silently would mislead
        given = next((f for f, v in (("--label_rule", args.label_rule), ("--score_thresh", args.score_thresh),
                                     ("--label_thresh", args.label_thresh)) if v is not None), None)
        if given:
            parser.error(f"{given} applies to a --submission; every cell of --labels counts as found")
    if args.json:  # checked before the work, not at its end
        writable_file(args.json, "--json", "metrics.json")
    # After parsing: --help and a bad flag answer without loading torch (about 2 s).
    from coco import build_coco_gt
    from dataloader import CLASS_FILES, LabelledImages, list_samples
    from errors import DatasetError
    from scoring import OTHER_IMAGES, image_ids, print_table, read_labels, read_submission, score, unscored_notes

    samples = list_samples(Path(args.data_dir), "--data_dir")
    ids = image_ids(samples, args.id_map_json)
    truth = LabelledImages(samples, ids, desc="decode ground truth", cache_images=False)
    if not any(len(i) for i in truth.instances):  # COCOeval would print AP -1, its "no ground truth"
        last = CLASS_FILES[len(CLASS_FILES)]
        raise DatasetError(f"{args.data_dir}: no labelled cell in any sample (<sample>/{CLASS_FILES[1]} ... {last}, "
                           "one id per cell); pass the labelled folder as --data_dir.")
    coco_gt = build_coco_gt(truth.instances, ids)
    if args.submission:
        shapes = {image_id: (t.height, t.width) for image_id, t in zip(ids, truth.instances)}
        results = read_submission(Path(args.submission), shapes)
    else:
        results = read_labels(Path(args.labels), samples, ids, [(i.height, i.width) for i in truth.instances])
    fix = OTHER_IMAGES if args.submission else ("label folders are matched to samples by name (<labels>/<sample>/), "
                                                "as inference.py --save_labels writes them: pass the folder it wrote "
                                                "for this data")
    for note in unscored_notes(samples, ids, results, args.submission or args.labels, fix):
        print(note)
    # Every cell of a label image was drawn as found; its id only ranks it for AP.
    found = next((t for t in (args.score_thresh, args.label_thresh) if t is not None), LABEL_THRESH)
    metrics = score(coco_gt, results, found if args.submission else 0.0, args.iou_thresh,
                    bool(args.submission) and by_evidence(args.label_rule))
    print_table(metrics, args.iou_thresh)
    if args.json:
        write_json(Path(args.json), metrics, indent=1)
    return metrics


if __name__ == "__main__":
    run_cli(main)
