"""Training DataLoader throughput: TIFFs decoded once (ours) vs on every access.

Ours is ``dataloader.LabelledImages``: every label image (and image) is decoded when the
dataset is built, so its construction is counted in epoch 1. The baseline decodes a
sample's TIFFs again each time the sample is read, as earlier implementations did. Both use
the default training augmentation (on compact instances, before the target is rendered) and
the same seeded sample order and augmentation draws, so they must yield the same targets. A
per-stage breakdown says where the baseline's time goes.

    python benchmarks/data_pipeline.py                 # 8 generated 1000x1000 samples
    python benchmarks/data_pipeline.py --train_dir ../shared/data/cpm15_hw3/train
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import tifffile  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from augment import ImageOnly, RandomFlip, build_crop_window, build_train_transforms  # noqa: E402
from benchmarks.common import (augment_defaults, base_parser, environment, print_table, ratio,  # noqa: E402
                               setup, timed, write_results)
from dataloader import (IMAGE_FILE, LabelledImages, collate_fn, decode_instances, list_samples,  # noqa: E402
                        read_image, render_target)
from synthetic import make_dataset  # noqa: E402

NAME = "data_pipeline"


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__)
    parser.add_argument("--train_dir", default=None, help="real <sample>/image.tif + classN.tif folder (default: generated)")
    parser.add_argument("--samples", type=int, default=8, help="samples to read (first N of --train_dir)")
    parser.add_argument("--size", type=int, nargs=2, default=[1000, 1000], metavar=("H", "W"), help="generated image size")
    parser.add_argument("--cells", type=int, nargs=2, default=[150, 800], metavar=("MIN", "MAX"),
                        help="cells drawn per generated image (overlaps may hide a few)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per dataset (the first includes construction)")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--decode_workers", type=int, default=2, help="threads LabelledImages decodes labels with")
    parser.add_argument("--crop", type=int, default=0,
                        help="train on random SIZE x SIZE windows (augment.build_crop_window), as train --crop")
    parser.add_argument("--no_breakdown", action="store_true", help="skip the per-stage breakdown")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = setup(args)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        samples = _samples(args, Path(tmp))
        _warm_file_cache(samples)
        ids = list(range(1, len(samples) + 1))
        aug_args = augment_defaults()
        aug_args.crop = args.crop
        transforms, window = build_train_transforms(aug_args), build_crop_window(aug_args)
        baseline = run_epochs(lambda: DecodeEveryAccess(samples, ids, transforms, window), args)
        ours = run_epochs(lambda: LabelledImages(samples, ids, transforms, decode_workers=args.decode_workers,
                                                  crop_window=window), args)
        stages = [] if args.no_breakdown or window else stage_breakdown(samples, transforms, args.seed)
    payload = summarize(args, device, samples, baseline, ours, stages)
    write_results(args, NAME, payload)
    return payload


class DecodeEveryAccess(LabelledImages):
    """The straightforward dataset: a sample's image and label TIFFs are decoded again on
    every access (defect 6 of the design). Image sizes come from the TIFF headers, so the
    baseline pays for no extra image decode."""

    def __init__(self, sample_dirs: Sequence[Path], image_ids: Sequence[int], transforms: Callable | None = None,
                 crop_window: Callable | None = None) -> None:
        super().__init__([], [], transforms, desc="baseline", crop_window=crop_window)  # decodes nothing
        self.sample_dirs = [Path(p) for p in sample_dirs]
        self.image_ids = list(image_ids)
        self.shapes = [_tiff_shape(p / IMAGE_FILE) for p in self.sample_dirs]
        self.instances = [None] * len(self.sample_dirs)
        self.images = [None] * len(self.sample_dirs)
        self.peaks = [None] * len(self.sample_dirs)  # none decoded: a float image's crop scales by its own peak

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        self.instances[index] = decode_instances(self.sample_dirs[index], self.shapes[index])
        try:
            return super().__getitem__(index)
        finally:
            self.instances[index] = None


def run_epochs(make_dataset: Callable[[], LabelledImages], args: argparse.Namespace) -> dict[str, Any]:
    """Construction time and per-epoch times, with a fingerprint of every target seen."""
    start = time.perf_counter()
    dataset = make_dataset()
    construct = time.perf_counter() - start
    instances = [len(inst) for inst in dataset.instances if inst is not None]
    epochs, fingerprints = [], []
    for epoch in range(args.epochs):
        torch.manual_seed(args.seed + epoch)  # same order and augmentation draws for both datasets
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, collate_fn=collate_fn,
                            num_workers=args.num_workers, generator=torch.Generator().manual_seed(args.seed + epoch))
        start = time.perf_counter()
        count = 0
        for _, targets in loader:
            count += len(targets)
            fingerprints.extend(_fingerprint(t) for t in targets)
            del targets
        epochs.append({"seconds": time.perf_counter() - start, "samples": count})
    epochs[0]["seconds"] += construct
    return {"construct_seconds": construct, "epochs": epochs, "fingerprints": fingerprints, "instances": instances}


def stage_breakdown(samples: Sequence[Path], transforms: Any, seed: int) -> list[dict[str, Any]]:
    """Mean seconds per sample of each stage of the baseline's ``__getitem__``; ours skips
    the two decodes, so the other rows are what is left to optimise."""
    dataset = LabelledImages(samples, range(1, len(samples) + 1), None, decode_workers=1, desc="breakdown")
    ops = list(getattr(transforms, "transforms", []))
    totals: dict[str, float] = {"read image": 0.0, "decode labels": 0.0}
    totals.update({f"augment: {_op_name(op)}": 0.0 for op in ops})
    totals["render target (packed masks)"] = 0.0
    torch.manual_seed(seed)
    for index, sample in enumerate(samples):
        for stage, seconds in _sample_stages(dataset, index, sample, ops):
            totals[stage] += seconds
    per_sample = {k: v / len(samples) for k, v in totals.items()}
    whole = sum(per_sample.values())
    return [{"stage": k, "seconds_per_sample": v, "share_of_baseline": ratio(v, whole)} for k, v in per_sample.items()]


def _sample_stages(dataset: LabelledImages, index: int, sample: Path, ops: list) -> list[tuple[str, float]]:
    """(stage, seconds) for one sample, each op applied to the previous op's output."""
    image, read_seconds = timed(partial(read_image, sample / IMAGE_FILE))
    stages = [("read image", read_seconds),
              ("decode labels", timed(partial(decode_instances, sample, image.shape[:2]))[1])]
    image, inst = dataset.raw(index)
    for op in ops:
        (image, inst), seconds = timed(partial(op, image, inst))
        stages.append((f"augment: {_op_name(op)}", seconds))
    stages.append(("render target (packed masks)", timed(partial(render_target, inst, index + 1))[1]))
    return stages


def summarize(args: argparse.Namespace, device: torch.device, samples: Sequence[Path], baseline: dict,
              ours: dict, stages: list[dict]) -> dict[str, Any]:
    rows = []
    for epoch, (b, o) in enumerate(zip(baseline["epochs"], ours["epochs"]), start=1):
        b_rate, o_rate = b["samples"] / b["seconds"], o["samples"] / o["seconds"]
        rows.append({"epoch": epoch, "baseline_samples_per_s": b_rate, "ours_samples_per_s": o_rate,
                     "speedup": ratio(o_rate, b_rate), "baseline_s": b["seconds"], "ours_s": o["seconds"]})
    later = [r["speedup"] for r in rows[1:]]
    targets = {
        "first_epoch_not_slower": rows[0]["speedup"] >= 1.0,
        "later_epochs_10x": bool(later) and min(later) >= 10.0,
    }
    same = baseline["fingerprints"] == ours["fingerprints"]
    window = f", {args.crop}px windows" if args.crop else ""
    title = (f"data pipeline: {len(samples)} samples{window}, batch {args.batch_size}, {args.num_workers} workers "
             f"(epoch 1 of ours includes {ours['construct_seconds']:.2f}s construction)")
    print_table(title, rows, ["epoch", "baseline_samples_per_s", "ours_samples_per_s", "speedup", "baseline_s", "ours_s"])
    bound = cache_bound(stages)
    if stages:
        print_table("where a baseline sample's time goes", stages, ["stage", "seconds_per_sample", "share_of_baseline"])
        print(f"most skipping the decodes alone can give (1 / (1 - decode share)): {bound:.2f}x")
    print(f"identical targets: {same}; targets met: {targets}")
    return {
        "benchmark": NAME,
        "environment": environment(device),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "data": {"source": args.train_dir or "generated", "samples": [p.name for p in samples],
                 "instances": ours["instances"]},
        "construct_seconds": {"baseline": baseline["construct_seconds"], "ours": ours["construct_seconds"]},
        "epochs": rows,
        "stages": stages,
        "cache_bound": bound,
        "identical_targets": same,
        "targets_met": targets,
    }


def cache_bound(stages: list[dict[str, Any]]) -> float | None:
    """Amdahl: the largest speedup that skipping the image and label decodes can give, when
    every other stage costs what it costs now."""
    if not stages:
        return None
    share = sum(s["share_of_baseline"] for s in stages if s["stage"] in ("read image", "decode labels"))
    return None if share >= 1 else 1 / (1 - share)


def _samples(args: argparse.Namespace, tmp: Path) -> list[Path]:
    if args.train_dir:
        return list_samples(Path(args.train_dir))[: args.samples]
    low, high = args.cells
    paths = make_dataset(tmp, n_train=args.samples, n_test=0, size=tuple(args.size), cells=(low, high + 1), seed=args.seed)
    return list_samples(paths["train_dir"])


def _warm_file_cache(samples: Sequence[Path]) -> None:
    """Read every file once, so neither side pays for a cold disk."""
    for sample in samples:
        for path in sample.iterdir():
            path.read_bytes()


def _tiff_shape(path: Path) -> tuple[int, int]:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        return int(page.imagelength), int(page.imagewidth)


def _fingerprint(target: dict) -> tuple:
    """Cheap identity of a target: id, labels, boxes and areas (areas follow the masks)."""
    return (int(target["image_id"]), target["labels"].tolist(), round(float(target["boxes"].sum()), 3),
            round(float(target["area"].sum()), 3))


def _op_name(op: Any) -> str:
    if isinstance(op, RandomFlip):
        return "horizontal flip" if op.horizontal else "vertical flip"
    op = op.transform if isinstance(op, ImageOnly) else op
    inner = getattr(op, "transforms", None)
    return type(inner[0]).__name__ if inner else type(op).__name__


if __name__ == "__main__":
    main()
