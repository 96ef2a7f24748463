"""Peak memory of predicting one image with ``inference.py --tta``, as the image grows.

Each (image side, variant) runs in a fresh process that predicts one generated image with the
4 flips on 256 px tiles (``--tile``) and reports:

- ``kept_mb``: the most feature bytes held at once between the detection and the mask passes
  (``predictor.state_bytes`` of the states kept, plus one redetected chunk), what lives on
  the GPU there;
- ``peak_rss_mb``: the process's peak resident memory from the prediction's start
  (``common.reset_peak_rss_kb``) less its size with the model loaded and the image generated,
  what a CPU run needs on top.

Variants: ``unbounded`` keeps every view's features until the mask pass (the path before
``Settings.feature_budget``); ``budget`` keeps at most ``--budget_mb`` and detects the rest
again for their masks. The two must give identical detections (``same_as_unbounded``).

    python benchmarks/predict_memory.py                 # --sizes 512 1024 --budget_mb 64
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (base_parser, environment, peak_rss_kb, print_table, ratio,  # noqa: E402
                               reset_peak_rss_kb, seed_all, write_results)

NAME = "predict_memory"
VARIANTS = ("unbounded", "budget")


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="sides of the generated images")
    parser.add_argument("--budget_mb", type=float, default=64.0, help="Settings.feature_budget of the budget variant")
    parser.add_argument("--backbone", default="resnet101", choices=("resnet101", "effnet_v2_m"))
    parser.add_argument("--input_scale", type=float, default=1.0, help="tiles enlarged by this (training: 2)")
    parser.add_argument("--batch_size", type=int, default=4, help="tiles x views per forward pass")
    parser.add_argument("--tile", type=int, default=256, help="inference.py's tile (the training --crop)")
    parser.add_argument("--detections_per_img", type=int, default=300)
    parser.add_argument("--rpn_post_nms_top_n_test", type=int, default=2000, help="proposals per view")
    parser.add_argument("--same_process", action="store_true",
                        help="measure every variant in this process: quicker, but peak_rss_mb then means nothing")
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "VARIANT"), default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args, int(args.one[0]), args.one[1])))
        return {}
    rows = []
    for size in args.sizes:
        for variant in VARIANTS:
            rows.append(measure_one(args, size, variant) if args.same_process
                        else _in_fresh_process(sys.argv[1:] if argv is None else argv, size, variant))
        unbounded, budget = rows[-2], rows[-1]
        budget["same_as_unbounded"] = budget.pop("digest") == unbounded.pop("digest")
        budget["kept_vs_unbounded"] = ratio(budget["kept_mb"], unbounded["kept_mb"])
    print_table(f"one image with --tta (4 flips, {args.tile} px tiles), {args.backbone}, {args.device}", rows,
                ["size", "variant", "views", "kept_mb", "peak_rss_mb", "seconds", "detections", "same_as_unbounded",
                 "kept_vs_unbounded"])
    budgets = [r["kept_mb"] for r in rows if r["variant"] == "budget"]
    targets = {"budget_flat_within_20pct": max(budgets) <= 1.2 * min(budgets),
               "identical_detections": all(r.get("same_as_unbounded", True) for r in rows)}
    print(f"targets met: {targets}")
    payload = {"benchmark": NAME, "environment": environment(torch.device(args.device)),
               "settings": {k: v for k, v in vars(args).items() if k not in ("json", "one")},
               "rows": rows, "targets_met": targets}
    write_results(args, NAME, payload)
    return payload


def _in_fresh_process(argv: Sequence[str], size: int, variant: str) -> dict[str, Any]:
    """One measurement in its own process, so no other variant's memory stays resident in it."""
    cmd = [sys.executable, __file__, *[a for a in argv if a != "--one"], "--one", str(size), variant]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} at {size}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_one(args: argparse.Namespace, size: int, variant: str) -> dict[str, Any]:
    import predictor
    from flags import TTA_SCALES
    from model import build_model
    from predictor import Settings, predict_images
    from synthetic import synth_image

    if args.threads:
        torch.set_num_threads(args.threads)
    seed_all(args.seed)
    device = torch.device(args.device)
    model = build_model({"backbone": args.backbone, "weights": "none", "input_scale": args.input_scale,
                         "max_size": 4 * size, "detections_per_img": args.detections_per_img,
                         "rpn_post_nms_top_n_test": args.rpn_post_nms_top_n_test}).to(device).eval()
    rng = np.random.default_rng(args.seed)
    image, _ = synth_image(rng, (size, size), size * size // 2000)
    image = torch.from_numpy(image).permute(2, 0, 1).float().div(255).to(device)
    budget = int(args.budget_mb * 2 ** 20) if variant == "budget" else 1 << 62
    settings = Settings(tile=args.tile, tta_scales=TTA_SCALES, batch_size=args.batch_size, feature_budget=budget)
    peak = _FeaturePeak(predictor, budget)
    base = reset_peak_rss_kb()
    start = time.perf_counter()
    with torch.no_grad(), peak:
        merged = predict_images([model], [image], settings)[0]
    seconds = time.perf_counter() - start
    digest = [merged["scores"].tolist(), merged["labels"].tolist(), int(merged["masks"].data.sum())]
    return {"size": size, "variant": variant, "views": peak.chunks_seen * args.batch_size,
            "kept_mb": round(peak.most / 2 ** 20, 1),
            "peak_rss_mb": round((peak_rss_kb() - base) / 1024, 1),
            "seconds": round(seconds, 1), "detections": len(merged["scores"]), "digest": digest}


class _FeaturePeak:
    """Wraps ``predictor.state_bytes`` to follow the feature bytes held: the kept states add up
    (until the budget), and a chunk detected again holds its own on top while its masks run."""

    def __init__(self, module: Any, budget: int) -> None:
        self.module, self.budget = module, budget
        self.total = self.kept = self.most = self.chunks_seen = self.depth = 0

    def __enter__(self) -> "_FeaturePeak":
        self.original = self.module.state_bytes

        def counted(state: Any) -> int:
            self.depth += 1  # state_bytes recurses through this wrapper: only the outer call is a chunk
            try:
                size = self.original(state)
            finally:
                self.depth -= 1
            if self.depth:
                return size
            self.chunks_seen += 1
            self.most = max(self.most, self.kept + size)  # this chunk's features exist now, kept or not
            self.total += size  # as predict_images counts: the states up to the budget stay
            if self.total <= self.budget:
                self.kept = self.total
            return size

        self.module.state_bytes = counted
        return self

    def __exit__(self, *exc: Any) -> None:
        self.module.state_bytes = self.original


if __name__ == "__main__":
    main()
