r"""Dataset statistics: the numbers the model defaults are chosen from.

Anchor sizes, detections per image and input size only fit the data if someone looks at
instance sizes, counts and image sizes; this script measures them and checks the test folder
against its id map, so a bad dataset is found before a day of training:
    python check_stats.py --train_dir dataset/train --test_dir dataset/test_release \
        --id_map_json dataset/test_image_name_to_ids.json --json stats.json
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import tifffile
from PIL import Image

from argtypes import HelpFormatter
from cli import run_cli
from dataloader import (CLASS_FILES, ID_MAP_FILE, IMAGE_FILE, TIFF_SUFFIXES, Instances, decode_instances, image_size,
                        is_whole, list_samples, map_beside, read_id_map, read_raw_image)
from errors import DatasetError
from files import writable_file, write_json
from progress import progress

PERCENTILES = (5, 25, 50, 75, 95)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--train_dir", required=True, help="folder of <sample>/image.tif + classN.tif")
    parser.add_argument("--test_dir", default=None, help="test folder, checked against its id map")
    parser.add_argument("--id_map_json", default=None,
                        help="the --test_dir's id map (default: test_image_name_to_ids.json beside it, as "
                             "inference.py finds it)")
    parser.add_argument("--json", default=None, help="also save the statistics here")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.id_map_json and not args.test_dir:
        parser.error("--id_map_json is checked against the images of a --test_dir; pass the folder it maps")
    if args.test_dir and not Path(args.test_dir).is_dir():
        parser.error(f"--test_dir {args.test_dir}: no such folder; pass the folder of test images")
    # The map beside the folder, as inference.py finds it; test_stats reports one that does not fit.
    id_map = Path(args.id_map_json or map_beside(args.test_dir)) if args.test_dir else None
    if id_map is not None and not args.id_map_json and not id_map.is_file():
        parser.error(f"--test_dir {args.test_dir}: no {ID_MAP_FILE} beside it; pass its map as --id_map_json")
    if args.json:  # checked before the work, not at its end
        writable_file(args.json, "--json", "stats.json")
    stats: dict[str, Any] = {"train": train_stats(Path(args.train_dir))}
    if id_map is not None:
        stats["test"] = test_stats(Path(args.test_dir), id_map)
    print_summary(stats)
    if args.json:
        write_json(Path(args.json), stats, indent=1)
        print(f"saved {args.json}")
    return stats


def found_problems(stats: dict[str, Any]) -> int:
    """How many problems ``main``'s survey found: unreadable training samples; in the test folder,
    duplicate ids, size mismatches and unreadable images, or 1 for an id map that does not fit it.
    The script exits with status 1 when there is any, so a job or a shell ``&&`` stops before
    training on a bad dataset."""
    test = stats.get("test")
    if test is None or test["consistent"]:
        found_in_test = 0
    elif "error" in test:
        found_in_test = 1
    else:
        found_in_test = len(test["size_mismatches"]) + len(test["unreadable"])
    return len(stats["train"]["problems"]) + found_in_test


def cli_main(argv: Sequence[str] | None = None) -> None:
    """``main``, with the exit status of a check: 0 for a clean dataset, 1 where problems were found."""
    problems = found_problems(main(argv))
    if problems:
        print(f"check_stats: {problems} problem(s) found, listed above; fix them before training", file=sys.stderr)
        raise SystemExit(1)


def train_stats(train_dir: Path) -> dict[str, Any]:
    """Counts, sizes and formats of the training set; a sample whose labels cannot be decoded
    is listed under ``problems`` instead of stopping the survey."""
    samples = list_samples(train_dir)
    per_image, image_hw, modes, label_dtypes, problems = [], [], Counter(), Counter(), {}
    areas: dict[int, list[float]] = {c: [] for c in CLASS_FILES}
    sides: dict[int, list[float]] = {c: [] for c in CLASS_FILES}
    empty = []
    for sample in progress(samples, "read labels"):
        try:
            info, dtypes, inst = survey_sample(sample)
        except DatasetError as err:
            problems[sample.name] = str(err)
            continue
        image_hw.append((info["height"], info["width"]))
        modes[info["mode"]] += 1
        label_dtypes.update(dtypes)
        per_image.append(len(inst))
        if len(inst) == 0:
            empty.append(sample.name)
        widths, heights = (inst.boxes[:, 2] - inst.boxes[:, 0]), (inst.boxes[:, 3] - inst.boxes[:, 1])
        for label, area, side in zip(inst.labels, inst.areas, np.sqrt(widths * heights)):
            areas[int(label)].append(float(area))
            sides[int(label)].append(float(side))
    return {
        "train_dir": str(train_dir),
        "samples": len(samples),
        "empty_samples": empty,
        "problems": problems,
        "classes": class_table(areas, sides),
        "instances_per_image": summary(per_image),
        "image_height": summary([h for h, _ in image_hw], ("min", "median", "max")),
        "image_width": summary([w for _, w in image_hw], ("min", "median", "max")),
        "image_modes": dict(modes),
        "label_dtypes": dict(label_dtypes),
    }


def test_stats(test_dir: Path, id_map_json: Path) -> dict[str, Any]:
    """The id map checked against the files (names both ways and unique ids, by ``read_id_map``;
    height and width from the image headers); the size mismatches and unreadable files are
    reported, not raised, so one run lists them all."""
    try:
        entries = read_id_map(id_map_json, test_dir)
    except DatasetError as err:
        return {"test_dir": str(test_dir), "consistent": False, "error": str(err)}
    mismatches, hw, modes, unreadable, unsized = [], [], Counter(), {}, 0
    for entry in progress(entries, "read test headers"):
        try:
            info = header_info(test_dir / entry["file_name"])
        except DatasetError as err:  # one bad file is reported with the rest, not a stop
            unreadable[entry["file_name"]] = str(err)
            continue
        hw.append((info["height"], info["width"]))
        modes[info["mode"]] += 1
        expected = (entry.get("height"), entry.get("width"))
        if not all(map(is_whole, expected)):
            unsized += 1  # sizes are optional: prediction and scoring read them from the images
        elif expected != (info["height"], info["width"]):
            mismatches.append({"file_name": entry["file_name"], "id_map": list(expected),
                               "file": [info["height"], info["width"]]})
    return {
        "test_dir": str(test_dir),
        "consistent": not mismatches and not unreadable,
        "images": len(entries),
        "size_mismatches": mismatches,
        "entries_without_size": unsized,
        "unreadable": unreadable,
        "image_height": summary([h for h, _ in hw], ("min", "median", "max")),
        "image_width": summary([w for _, w in hw], ("min", "median", "max")),
        "image_modes": dict(modes),
    }


def survey_sample(sample: Path) -> tuple[dict[str, Any], list[str], Instances]:
    """Image header, label dtypes and instances of one sample; each label file is decoded once,
    and the image as training reads it, so a sample training would refuse (a Z stack, two
    channels stored as planes, a colour space not converted) is a problem here too."""
    info = tiff_info(sample / IMAGE_FILE)
    read_raw_image(sample / IMAGE_FILE)
    dtypes = [tiff_info(sample / name)["dtype"] for name in CLASS_FILES.values() if (sample / name).exists()]
    return info, dtypes, decode_instances(sample, (info["height"], info["width"]))


def header_info(path: Path) -> dict[str, Any]:
    """``tiff_info`` for a TIFF; for the PNG and JPEG files inference.py also predicts, the size
    and PIL's mode from the header."""
    height, width = image_size(path)  # refuses, from the header, what prediction refuses (a Z stack)
    if path.suffix.lower() in TIFF_SUFFIXES:
        return tiff_info(path)
    with Image.open(path) as image:
        return {"height": height, "width": width, "mode": f"{image.format} {image.mode}"}


def tiff_info(path: Path) -> dict[str, Any]:
    """Height, width and format from the TIFF header: no pixel is decoded."""
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            mode = f"{page.photometric.name} {page.samplesperpixel}-channel {page.dtype}"
            return {"height": int(page.imagelength), "width": int(page.imagewidth), "mode": mode,
                    "dtype": str(page.dtype)}
    except Exception as err:  # tifffile raises many types for corrupt files
        raise DatasetError(f"{path}: unreadable TIFF header ({type(err).__name__}: {err}); re-export it or remove "
                           "the sample.") from err


def class_table(areas: dict[int, list[float]], sides: dict[int, list[float]]) -> dict[str, Any]:
    """Per class and overall: count, share, area and box side (sqrt(w*h), the scale an
    anchor has to match) percentiles."""
    total = sum(len(v) for v in areas.values())
    table = {}
    for name, area, side in [(f"class{c}", areas[c], sides[c]) for c in areas] + [
            ("all", _chain(areas.values()), _chain(sides.values()))]:
        table[name] = {"count": len(area), "share": len(area) / total if total else 0.0,
                       "area": percentiles(area), "box_side": percentiles(side)}
    return table


def summary(values: Sequence[float], keys: Iterable[str] = ("min", "median", "mean", "max")) -> dict[str, float | None]:
    functions = {"min": np.min, "median": np.median, "mean": np.mean, "max": np.max}
    return {k: (float(functions[k](values)) if len(values) else None) for k in keys}


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not len(values):
        return {f"p{q}": None for q in PERCENTILES}
    return {f"p{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(values, PERCENTILES))}


def print_summary(stats: dict[str, Any]) -> None:
    train = stats["train"]
    print(f"{train['train_dir']}: {train['samples']} samples, {len(train['empty_samples'])} empty, "
          f"{len(train['problems'])} unreadable")
    for name, problem in train["problems"].items():
        print(f"  problem {name}: {problem}")
    print(f"instances per image: {_fmt(train['instances_per_image'])}")
    print(f"image height: {_fmt(train['image_height'])} | width: {_fmt(train['image_width'])}")
    print(f"image modes: {train['image_modes']} | label dtypes: {train['label_dtypes']}")
    print(f"{'class':>7} {'count':>7} {'share':>6}   area p5/p25/p50/p75/p95        box side p5/p25/p50/p75/p95")
    for name, row in train["classes"].items():
        print(f"{name:>7} {row['count']:>7} {row['share']:>6.1%}   {_pcts(row['area']):<30} {_pcts(row['box_side'])}")
    if "test" in stats:
        _print_test(stats["test"])


def _print_test(test: dict[str, Any]) -> None:
    if "error" in test:
        print(f"test: INCONSISTENT: {test['error']}")
        return
    state = "consistent" if test["consistent"] else "INCONSISTENT"
    print(f"test: {test['images']} images, id map {state}; {len(test['size_mismatches'])} size mismatches")
    if test.get("entries_without_size"):
        print(f"note: {test['entries_without_size']} id map entries give no whole-number height and width; not "
              "needed (prediction and scoring read sizes from the images), not checked")
    for bad in test["size_mismatches"][:5]:
        print(f"  {bad['file_name']}: id map says {bad['id_map']}, file is {bad['file']}")
    for problem in list(test["unreadable"].values())[:5]:
        print(f"  unreadable: {problem}")
    print(f"test image height: {_fmt(test['image_height'])} | width: {_fmt(test['image_width'])}")
    print(f"test image modes: {test['image_modes']}")


def _chain(lists: Iterable[list[float]]) -> list[float]:
    return [v for values in lists for v in values]


def _fmt(values: dict[str, float | None]) -> str:
    return " / ".join(f"{k} {'-' if v is None else f'{v:g}'}" for k, v in values.items())


def _pcts(values: dict[str, float | None]) -> str:
    return "/".join("-" if v is None else f"{v:.0f}" for v in values.values())


if __name__ == "__main__":
    run_cli(cli_main)
