"""Training step time per backbone, with and without the attention modules (--use_attn) and
the optional heads (--mask_iou, --cascade).

One image of the given size with the given number of cells, random weights (``--weights
none``), the default detection settings at native scale, training's fused AdamW; a few warm-up
steps, then the mean of N timed steps (forward, backward, optimizer step). Every row is reported
as a ratio to ResNet-101 without attention, measured in the same run.

    python benchmarks/step_time.py                      # 512x512, 300 cells
    python benchmarks/step_time.py --train_dir ../shared/data/cpm15_hw3/train
    python benchmarks/step_time.py --backbones resnet101 --attn off --heads none mask_iou cascade mask_iou+cascade
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import importlib  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import torch  # noqa: E402

from benchmarks.common import base_parser, environment, print_table, ratio, setup, timed, write_results  # noqa: E402
from dataloader import LabelledImages, list_samples  # noqa: E402
from devices import autocast, native_bf16  # noqa: E402
from engine import to_device  # noqa: E402
from model import BACKBONES, DEFAULT_CONFIG, build_model  # noqa: E402
from optimisation import fused_adamw  # noqa: E402
from synthetic import make_dataset  # noqa: E402

NAME = "step_time"
BASELINE = ("resnet101", False, "none")
HEADS = ("none", "mask_iou", "cascade", "mask_iou+cascade", "type_map")


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__)
    parser.add_argument("--train_dir", default=None, help="time on the real sample with the most instances")
    parser.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"), help="generated image size")
    parser.add_argument("--cells", type=int, default=300, help="cells in the generated image")
    parser.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    parser.add_argument("--attn", choices=("off", "on", "both"), default="both", help="which --use_attn settings to time")
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=["none"],
                        help="optional heads to time: the Mask Scoring head, the Cascade box stages, both, "
                             "the cell-type map")
    parser.add_argument("--batch_size", type=int, default=1, help="copies of the image per step")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--use_amp", action="store_true", help="autocast as --use_amp (devices.amp_dtype)")
    parser.add_argument("--compare_amp", action="store_true",
                        help="time each row also under autocast, on the same model: amp_vs_fp32; bf16 even on a "
                             "CPU without bf16 instructions, where --use_amp runs float32 (what it would cost)")
    parser.add_argument("--rpn_post_nms_top_n_train", type=int, default=DEFAULT_CONFIG["rpn_post_nms_top_n_train"])
    parser.add_argument("--box_batch_size_per_image", type=int, default=DEFAULT_CONFIG["box_batch_size_per_image"])
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = setup(args)
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        sample = _sample(args, Path(tmp))
        image, target = LabelledImages([sample], [1], decode_workers=1, desc="sample").load(0)
    attention_error = attention_unavailable()
    rows = []
    for backbone in args.backbones:
        for use_attn in {"off": [False], "on": [True], "both": [False, True]}[args.attn]:
            for heads in args.heads:
                if use_attn and attention_error:
                    rows.append({"backbone": backbone, "use_attn": True, "heads": heads,
                                 "note": f"skipped: {attention_error}"})
                    continue
                rows.append(measure(backbone, use_attn, heads, image, target, args, device))
    payload = summarize(args, device, rows, len(target["labels"]), tuple(image.shape[-2:]), attention_error)
    write_results(args, NAME, payload)
    return payload


def measure(backbone: str, use_attn: bool, heads: str, image: torch.Tensor, target: dict,
            args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Mean and spread of the timed steps of one configuration."""
    height, width = image.shape[-2:]
    config = {"backbone": backbone, "weights": "none", "use_attn": use_attn,
              "min_size": min(height, width), "max_size": max(height, width), "input_scale": 0.0,
              "rpn_post_nms_top_n_train": args.rpn_post_nms_top_n_train,
              "box_batch_size_per_image": args.box_batch_size_per_image,
              "mask_iou": "mask_iou" in heads, "cascade": "cascade" in heads,
              "type_map": 0.5 if "type_map" in heads else 0.0}
    torch.manual_seed(args.seed)
    model = build_model(config).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = fused_adamw(params, lr=1e-5, weight_decay=1e-4)  # training's (a plain AdamW: 6x its CPU time)
    images, targets = to_device([image] * args.batch_size, [target] * args.batch_size, device)
    def steps(use_amp: bool, even_if_slow: bool = False) -> list[float]:
        times = []
        for step in range(args.warmup + args.steps):
            step_once = lambda: _train_step(model, optimizer, images, targets, device, use_amp, even_if_slow)  # noqa: E731
            _, seconds = timed(step_once, device)
            if step >= args.warmup:
                times.append(seconds)
        return times

    times = steps(args.use_amp and not args.compare_amp)
    row = {"backbone": backbone, "use_attn": use_attn, "heads": heads, "params_m": sum(p.numel() for p in params) / 1e6,
           "step_s": statistics.mean(times), "std_s": statistics.pstdev(times), "all_s": times}
    if args.compare_amp:
        amp = steps(True, even_if_slow=True)  # bf16 even where --use_amp would run float32: its cost
        row.update(amp_step_s=statistics.mean(amp), amp_all_s=amp, amp_vs_fp32=statistics.mean(amp) / row["step_s"])
    return row


def attention_unavailable() -> str | None:
    """Why ``--use_attn`` cannot be built here (attention_modules.py missing or broken), or None."""
    try:
        importlib.import_module("attention_modules")
    except Exception as err:  # a half-written module may raise anything
        return f"import attention_modules failed ({type(err).__name__}: {err})"
    return None


def summarize(args: argparse.Namespace, device: torch.device, rows: list[dict], instances: int,
              size: tuple[int, int], attention_error: str | None) -> dict[str, Any]:
    base = next((r for r in rows if (r["backbone"], r["use_attn"], r["heads"]) == BASELINE and "step_s" in r), None)
    for row in rows:
        row["ratio_vs_resnet101"] = ratio(row.get("step_s"), base["step_s"] if base else None)
    title = (f"training step, {size[0]}x{size[1]}, {instances} instances, batch {args.batch_size}, "
             f"mean of {args.steps} after {args.warmup} warm-up")
    amp = ["amp_step_s", "amp_vs_fp32"] if args.compare_amp else []
    print_table(title, rows, ["backbone", "use_attn", "heads", "params_m", "step_s", "std_s", "ratio_vs_resnet101", *amp])
    for row in rows:
        if "note" in row:
            print(f"{row['backbone']} --use_attn {row['note']}")
    return {"benchmark": NAME, "environment": {**environment(device), "native_bf16": native_bf16()},
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "sample": {"instances": instances, "size": list(size)}, "attention_error": attention_error, "rows": rows}


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: list, targets: list,
                device: torch.device, use_amp: bool, even_if_slow: bool = False) -> None:
    with autocast(device, use_amp, even_if_slow):
        losses = model(images, targets)
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    optimizer.step()


def _sample(args: argparse.Namespace, tmp: Path) -> Path:
    if args.train_dir:
        samples = list_samples(Path(args.train_dir))
        counts = [len(i) for i in LabelledImages(samples, range(1, len(samples) + 1), desc="count").instances]
        return samples[counts.index(max(counts))]
    paths = make_dataset(tmp, n_train=1, n_test=0, size=tuple(args.size), cells=(args.cells, args.cells + 1),
                         seed=args.seed)
    return list_samples(paths["train_dir"])[0]


if __name__ == "__main__":
    main()
