"""Peak memory and time of one training step as the instance count grows: stock vs ours.

Stock is torchvision's path: ``GeneralizedRCNNTransform`` (it interpolates the image and
every ground-truth mask as float, even at scale 1.0), torchvision's mask targets (a float copy
of every mask at full image size), the masks as the contract's [N, H, W] tensor, and
``box_iou`` + ``Matcher`` for the RPN's anchor matching. Ours is ``detector.CellTransform``
(native scale skips the mask resize), ``detector.project_masks_on_boxes`` (each matched mask
cropped to its RoIs), the dataset's packed masks (``masks.PackedMasks``: crops only, never a
full-image mask) and ``detector.SlicedMatcher`` (anchor matching without the [cells, anchors] IoU
matrix). Both run at scale 1.0 from the same seed, so every loss component must agree.

Each configuration runs in a fresh process (the script re-invokes itself with ``--worker``):
on a CPU the step's peak is the process's resident high-water mark, reset just before the
sample's target is built (``common.reset_peak_rss_kb``), minus the resident size then (so
stock's full-size masks count); on CUDA it is ``max_memory_allocated`` minus the memory
allocated at that point.

    python benchmarks/train_memory.py                      # 100, 400, 800 cells at 1000x1000
    python benchmarks/train_memory.py --train_dir ../shared/data/cpm15_hw3/train
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import torch  # noqa: E402
from torchvision.models.detection import roi_heads  # noqa: E402
from torchvision.models.detection.transform import GeneralizedRCNNTransform  # noqa: E402
from torchvision.models.detection._utils import Matcher  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

from benchmarks.common import (add_launcher_arg, base_parser, environment, peak_rss_kb, print_table,  # noqa: E402
                               ratio, reset_peak_rss_kb, seed_all, setup, synchronize, worker_script, write_results)
from dataloader import LabelledImages, list_samples  # noqa: E402
from engine import to_device  # noqa: E402
from model import build_model  # noqa: E402
from optimisation import fused_adamw  # noqa: E402
from synthetic import make_dataset  # noqa: E402

NAME = "train_memory"
VARIANTS = ("stock", "ours")
RESULT_MARK = "WORKER_RESULT "
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-5


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__)
    add_launcher_arg(parser)
    parser.add_argument("--train_dir", default=None, help="real samples instead of generated ones")
    parser.add_argument("--samples", type=int, default=3, help="with --train_dir: the N samples with most instances")
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 400, 800], help="cells per generated image")
    parser.add_argument("--size", type=int, nargs=2, default=[1000, 1000], metavar=("H", "W"), help="generated image size")
    parser.add_argument("--backbone", default="resnet101", choices=("resnet101", "effnet_v2_m"))
    parser.add_argument("--layout", default="imagenet", choices=("imagenet", "none"),
                        help="the backbone layout of --weights imagenet (frozen BatchNorm, stem and first stage "
                             "frozen; built without downloading anything) or of --weights none (GroupNorm, all "
                             "layers trained, so more activations kept for the backward pass)")
    parser.add_argument("--steps", type=int, default=2,
                        help="training steps per configuration; time is the mean after the first")
    parser.add_argument("--rpn_post_nms_top_n_train", type=int, default=2000, help="same for both sides")
    parser.add_argument("--box_batch_size_per_image", type=int, default=512, help="same for both sides")
    parser.add_argument("--in_process", action="store_true",
                        help="run every configuration in this process (fast, for tests; memory then not isolated)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = setup(args)
    if args.worker:
        result = measure_step(json.loads(args.worker), device)
        print(RESULT_MARK + json.dumps(result), flush=True)
        return result
    with tempfile.TemporaryDirectory(prefix="bench_mem_") as tmp:
        samples = _samples(args, Path(tmp))
        rows = []
        for sample in samples:
            pair = {v: _run(_spec(args, sample, v), args, device) for v in VARIANTS}
            rows.append(compare(sample.name, pair))
    payload = summarize(args, device, rows)
    write_results(args, NAME, payload)
    return payload


def measure_step(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Losses, step times and memory of ``spec['steps']`` training steps of one configuration."""
    seed_all(spec["seed"])
    dataset = LabelledImages([Path(spec["sample"])], [1], decode_workers=1, desc="sample")
    model, optimizer = _model(spec, (dataset.instances[0].height, dataset.instances[0].width), device)
    gc.collect()
    before = _memory_now(device)  # the sample's target counts: stock holds every mask at full size
    image, target = dataset.load(0)
    if spec["variant"] == "stock":
        target["masks"] = target["masks"].full()
    images, targets = to_device([image], [target], device)
    losses, seconds = {}, []
    for step in range(spec["steps"]):
        torch.manual_seed(spec["seed"])  # same RPN/RoI sampling on both sides
        synchronize(device)
        start = time.perf_counter()
        step_losses = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(step_losses.values()).backward()
        optimizer.step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        if step == 0:
            losses = {k: float(v.detach()) for k, v in step_losses.items()}
        del step_losses
    peak = _memory_peak(device)
    return {"variant": spec["variant"], "instances": int(len(target["labels"])), "size": list(image.shape[-2:]),
            "losses": losses, "step_seconds": seconds, "memory_before_mb": before, "memory_peak_mb": peak,
            "step_peak_mb": max(peak - before, 0.0)}


def compare(name: str, pair: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One table row: stock vs ours for one sample."""
    stock, ours = pair["stock"], pair["ours"]
    diffs = {k: abs(stock["losses"][k] - ours["losses"][k]) for k in stock["losses"]}
    equal = all(d <= LOSS_ATOL + LOSS_RTOL * abs(stock["losses"][k]) for k, d in diffs.items())
    return {
        "sample": name, "instances": ours["instances"], "size": "x".join(map(str, ours["size"])),
        "stock_step_peak_mb": stock["step_peak_mb"], "ours_step_peak_mb": ours["step_peak_mb"],
        "peak_ratio": ratio(ours["step_peak_mb"], stock["step_peak_mb"]),
        "stock_abs_peak_mb": stock["memory_peak_mb"], "ours_abs_peak_mb": ours["memory_peak_mb"],
        "stock_step_s": _step_time(stock), "ours_step_s": _step_time(ours),
        "time_ratio": ratio(_step_time(ours), _step_time(stock)),
        "losses_equal": equal, "max_loss_diff": max(diffs.values()),
        "stock": stock, "ours": ours,
    }


def summarize(args: argparse.Namespace, device: torch.device, rows: list[dict[str, Any]]) -> dict[str, Any]:
    add_growth(rows)
    columns = ["sample", "instances", "size", "stock_step_peak_mb", "ours_step_peak_mb", "peak_ratio", "growth_ratio",
               "stock_abs_peak_mb", "ours_abs_peak_mb", "stock_step_s", "ours_step_s", "time_ratio",
               "losses_equal", "max_loss_diff"]
    unit = "peak RSS" if device.type == "cpu" else "max_memory_allocated"
    isolation = "same process (not isolated)" if args.in_process else "one process per configuration"
    print_table(f"one training step, batch 1, {args.backbone} ({args.layout} layout), {unit} in MB, {isolation}", rows, columns)
    densest = max(rows, key=lambda r: r["instances"])
    targets = {
        "peak_at_most_a_third_of_stock": densest["peak_ratio"] is not None and densest["peak_ratio"] <= 1 / 3,
        "losses_equal": all(r["losses_equal"] for r in rows),
        "time_no_worse": all(r["time_ratio"] is not None and r["time_ratio"] <= 1.0 for r in rows),
    }
    print(f"targets met (densest: {densest['instances']} instances): {targets}")
    return {"benchmark": NAME, "environment": environment(device),
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "worker")},
            "memory_unit": unit, "isolated": not args.in_process, "rows": rows, "targets_met": targets}


def add_growth(rows: list[dict[str, Any]]) -> None:
    """growth_ratio: how much ours' step peak grows from the sparsest sample, over how much
    stock's grows; it isolates the memory that depends on the instance count from the
    activations both sides share."""
    sparsest = min(rows, key=lambda r: r["instances"])
    for row in rows:
        grown = {v: row[f"{v}_step_peak_mb"] - sparsest[f"{v}_step_peak_mb"] for v in VARIANTS}
        row["growth_ratio"] = ratio(grown["ours"], grown["stock"]) if row is not sparsest else None


def _model(spec: dict[str, Any], size: Sequence[int], device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model of one side, built from the same seed: the two sides differ only in the
    transform, the anchor matching and the mask-target function."""
    height, width = int(size[0]), int(size[1])
    config = {"backbone": spec["backbone"], "weights": spec["layout"], "min_size": min(height, width),
              "max_size": max(height, width), "input_scale": 0.0,
              "rpn_post_nms_top_n_train": spec["rpn_post_nms_top_n_train"],
              "box_batch_size_per_image": spec["box_batch_size_per_image"]}
    torch.manual_seed(spec["seed"])
    model = build_model(config, load_weights=False).to(device).train()  # memory does not depend on the values
    if spec["variant"] == "stock":
        use_stock_path(model, height, width)
    optimizer = fused_adamw([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=1e-4)  # training's
    return model, optimizer


def use_stock_path(model: torch.nn.Module, height: int, width: int) -> None:
    """torchvision's transform, resizing an image to ``height`` x ``width``, its anchor
    matching and its mask targets on ``model``."""
    model.transform = stock_transform(height, width)
    model.roi_heads.mask_targets = roi_heads.project_masks_on_boxes
    model.rpn.box_similarity, model.rpn.proposal_matcher = box_iou, Matcher(0.7, 0.3, True)


def stock_transform(height: int, width: int) -> GeneralizedRCNNTransform:
    """torchvision's transform that resizes an image to this size (scale 1.0 at its own size)."""
    transform = GeneralizedRCNNTransform(min_size=min(height, width), max_size=max(height, width),
                                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    # One min_size: the choice is fixed, and drawing it from the RNG would desynchronise the samplers.
    transform.torch_choice = lambda sizes: sizes[0]
    return transform


def _run(spec: dict[str, Any], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One configuration, in a fresh process unless --in_process."""
    if args.in_process:
        return measure_step(spec, device)
    command = [sys.executable, *worker_script(args.launcher, __file__), "--worker", json.dumps(spec),
               "--device", args.device]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise RuntimeError(f"worker for {spec['variant']} on {spec['sample']} failed (exit {done.returncode}):\n"
                       f"{done.stderr[-3000:]}")


def _spec(args: argparse.Namespace, sample: Path, variant: str) -> dict[str, Any]:
    return {"sample": str(sample), "variant": variant, "seed": args.seed, "steps": args.steps,
            "backbone": args.backbone, "layout": args.layout, "rpn_post_nms_top_n_train": args.rpn_post_nms_top_n_train,
            "box_batch_size_per_image": args.box_batch_size_per_image}


def _samples(args: argparse.Namespace, tmp: Path) -> list[Path]:
    if args.train_dir:
        samples = list_samples(Path(args.train_dir))
        counts = LabelledImages(samples, range(1, len(samples) + 1), desc="count instances").instances
        densest = sorted(zip(samples, counts), key=lambda sc: len(sc[1]), reverse=True)[: args.samples]
        return [s for s, _ in sorted(densest, key=lambda sc: len(sc[1]))]
    out = []
    for count in args.counts:
        paths = make_dataset(tmp / f"cells_{count}", n_train=1, n_test=0, size=tuple(args.size),
                             cells=(count, count + 1), seed=args.seed)
        out.append(list_samples(paths["train_dir"])[0])
    return out


def _step_time(result: dict[str, Any]) -> float:
    """Mean step time after the first (warm-up) step, or the only step."""
    times = result["step_seconds"]
    return sum(times[1:]) / len(times[1:]) if len(times) > 1 else times[0]


def _memory_now(device: torch.device) -> float:
    """MB in use now, the peak reset: resident set size on a CPU, allocated tensors on CUDA."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    return reset_peak_rss_kb() / 2**10  # the peak count starts here too


def _memory_peak(device: torch.device) -> float:
    """Peak MB since ``_memory_now``: of the process's resident set on a CPU, of tensors on CUDA."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_kb() / 2**10


if __name__ == "__main__":
    main()
