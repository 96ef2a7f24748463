"""Prediction seconds per image under the detection caps, side by side on one checkpoint.

Each 256 px tile can return up to 1000 detections (its area over the smallest anchor side
squared), and every detection kept gets a mask. The per-image-and-class cap keeps at most what
the scorer counts (100 a class), so far fewer masks are computed, pasted and encoded. Rows:

- ``image 1000``: the image cap alone (before the class cap was the default);
- ``image 400``: a smaller image cap (what users were told to pass);
- ``image 1000, class 100``: today's defaults (the class cap after the mask merge, on twice its candidates);
- ``class 100 before the merge``: the class cap on as many candidates as it keeps (the defaults before).

The variants run interleaved ``--repeats`` times (the median is reported), through
``inference.predict_folder`` as the CLI runs it.

    python benchmarks/prediction_caps.py                   # random weights, generated images
    python benchmarks/prediction_caps.py --checkpoint runs/consep_split0/cells_0/best.pth \\
        --train_dir ../shared/data/consep_hw3/train --images 20
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from typing import Any, Sequence  # noqa: E402

from benchmarks.common import base_parser, environment, print_table, ratio, setup, timed, write_results  # noqa: E402
from benchmarks.inference import make_test_folder, random_checkpoint  # noqa: E402
from dataloader import read_id_map  # noqa: E402
from inference import predict_folder  # noqa: E402
from predictor import Settings  # noqa: E402

NAME = "prediction_caps"
VARIANTS = {"image 1000": {"detections_per_img": 1000, "detections_per_class": 0},
            "image 400": {"detections_per_img": 400, "detections_per_class": 0},
            "image 1000, class 100": {"detections_per_img": 1000, "detections_per_class": 100},
            # the class cap taken before the mask merge, on as many candidates as it keeps (the code until
            # Settings.class_pool): what the twice-as-many candidates of a tiled image cost
            "class 100 before the merge": {"detections_per_img": 1000, "detections_per_class": 100, "class_pool": 1}}


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__)
    parser.add_argument("--checkpoint", default=None,
                        help="a trained checkpoint (default: random weights, written here)")
    parser.add_argument("--test_dir", default=None, help="real test folder (with --id_map_json)")
    parser.add_argument("--id_map_json", default=None, help="id map of --test_dir")
    parser.add_argument("--train_dir", default=None, help="use the first --images training images as the test set")
    parser.add_argument("--images", type=int, default=4, help="images predicted per variant")
    parser.add_argument("--size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"),
                        help="generated image size")
    parser.add_argument("--cells", type=int, default=40, help="cells per generated image")
    parser.add_argument("--backbone", default="resnet101", choices=("resnet101", "effnet_v2_m"))
    parser.add_argument("--tile", type=int, default=None, help="prediction tile (default: the checkpoint's --crop)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs of every variant")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    args.detections_per_img = 1000  # the random checkpoint's own cap: the variants override it
    device = setup(args)
    seconds: dict[str, list[float]] = {name: [] for name in args.variants}
    detections: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="bench_caps_") as tmp:
        tmp = Path(tmp)
        test_dir, id_map = make_test_folder(args, tmp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else random_checkpoint(args, tmp / "random.pth")
        count = len(read_id_map(id_map, test_dir))
        for _ in range(args.repeats):
            for name in args.variants:
                out = tmp / f"{name}.json"
                caps = dict(VARIANTS[name])
                pool = caps.pop("class_pool", Settings.class_pool)
                settings = Settings(tile=args.tile, batch_size=None, class_pool=pool)
                _, took = timed(lambda: predict_folder(checkpoint, test_dir, id_map, out, settings, device=str(device),
                                                       overrides=caps), device)
                seconds[name].append(took)
                detections[name] = len(json.loads(out.read_text()))
    first = args.variants[0]
    rows = [{"variant": name, **VARIANTS[name], "seconds_per_image": statistics.median(seconds[name]) / count,
             "detections_per_image": detections[name] / count,
             "speedup": ratio(statistics.median(seconds[first]), statistics.median(seconds[name]))}
            for name in args.variants]
    print_table(f"prediction, {count} images, median of {args.repeats} interleaved runs, {device}", rows,
                ["variant", "seconds_per_image", "detections_per_image", "speedup"])
    payload = {"benchmark": NAME, "environment": environment(device),
               "settings": {k: v for k, v in vars(args).items() if k != "json"}, "images": count, "rows": rows}
    write_results(args, NAME, payload)
    return payload


if __name__ == "__main__":
    main()
