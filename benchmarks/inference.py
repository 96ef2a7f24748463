"""Images per second from a test folder to a finished test-results.json: ours vs a plain loop.

Ours is ``inference.predict_folder`` (``predictor.predict_each``: batched forward, masks pasted only
inside their boxes in one batch, RLE from the crops, compact JSON), at each batch size with and without
``--use_amp`` (``devices.amp_dtype``). The plain loop runs one image per forward, lets torchvision
paste every mask at full image size, thresholds and ``pycocotools``-encodes the masks one by
one in fp32 and writes indented JSON. Both start from the same checkpoint; at fp32 batch 1
they must write the same detections, and the other settings report how many they match.

    python benchmarks/inference.py                          # 8 generated 512x512 images
    python benchmarks/inference.py --train_dir ../shared/data/cpm15_hw3/train --images 4
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from faster_coco_eval.core import mask as mask_util  # noqa: E402

from benchmarks.common import base_parser, environment, print_table, ratio, setup, timed, write_results  # noqa: E402
from checkpoint import load_model, save_checkpoint  # noqa: E402
from dataloader import IMAGE_FILE, list_samples, read_id_map, read_image  # noqa: E402
from devices import precision  # noqa: E402
from inference import predict_folder  # noqa: E402
from predictor import MaskRCNNStages, Settings  # noqa: E402
from model import build_model  # noqa: E402
from synthetic import make_dataset  # noqa: E402

NAME = "inference"
MATCH_IOU = 0.9  # mask IoU above which two detections count as the same
MATCH_SCORE = 0.02  # largest score difference of two detections that count as the same


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__)
    parser.add_argument("--test_dir", default=None, help="real test folder (with --id_map_json)")
    parser.add_argument("--id_map_json", default=None, help="id map of --test_dir")
    parser.add_argument("--train_dir", default=None, help="use the first --images training images as the test set")
    parser.add_argument("--checkpoint", default=None, help="a trained checkpoint (default: random weights, written here)")
    parser.add_argument("--images", type=int, default=8, help="generated test images")
    parser.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    parser.add_argument("--cells", type=int, default=300, help="cells per generated image")
    parser.add_argument("--detections_per_img", type=int, default=300)
    parser.add_argument("--rpn_post_nms_top_n_test", type=int, default=None,
                        help="proposals kept for the box head (default: the checkpoint's)")
    parser.add_argument("--backbone", default="resnet101", choices=("resnet101", "effnet_v2_m"))
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--amp", choices=("off", "on", "both"), default="both", help="which --use_amp settings to run")
    parser.add_argument("--num_workers", type=int, default=0, help="decoding workers of ours (the plain loop has none)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = setup(args)
    overrides = {"detections_per_img": args.detections_per_img, "rpn_post_nms_top_n_test": args.rpn_post_nms_top_n_test}
    with tempfile.TemporaryDirectory(prefix="bench_infer_") as tmp:
        tmp = Path(tmp)
        test_dir, id_map = make_test_folder(args, tmp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else random_checkpoint(args, tmp / "random.pth")
        count = len(read_id_map(id_map, test_dir))
        reference, seconds = timed(lambda: plain_loop(checkpoint, test_dir, id_map, tmp / "plain.json", device,
                                                      overrides), device)
        rows = [_row("plain loop", 1, False, count, seconds, seconds, reference, reference)]
        _, floor = timed(lambda: forward_only(checkpoint, test_dir, id_map, device, overrides), device)
        rows.append({"path": "forward only", "batch": 1, "amp": False, "images_per_s": count / floor,
                     "seconds": floor, "speedup": ratio(seconds, floor)})
        for amp in {"off": [False], "on": [True], "both": [False, True]}[args.amp]:
            for batch_size in args.batch_sizes:
                out = tmp / f"ours_b{batch_size}_amp{int(amp)}.json"
                _, ours_seconds = timed(lambda: predict_folder(
                    checkpoint, test_dir, id_map, out, Settings(tile=None, batch_size=batch_size, use_amp=amp),
                    device=str(device), overrides=overrides, num_workers=args.num_workers), device)
                results = json.loads(out.read_text())
                rows.append({**_row("ours", batch_size, amp, count, ours_seconds, seconds, reference, results),
                             "precision": precision(device, amp)})
    payload = summarize(args, device, count, rows)
    write_results(args, NAME, payload)
    return payload


@torch.no_grad()
def plain_loop(checkpoint: Path, test_dir: Path, id_map_json: Path, output: Path, device: torch.device,
               overrides: dict[str, Any]) -> list[dict]:
    """The straightforward submission: one image per forward, full-size masks pasted by
    torchvision, each mask thresholded and encoded on its own, fp32, indented JSON."""
    model, _, _ = load_model(checkpoint, overrides)
    model.to(device).eval()
    results = []
    for entry in read_id_map(id_map_json, test_dir):
        image = torch.from_numpy(read_image(test_dir / entry["file_name"])).permute(2, 0, 1).to(device)
        pred = model([image])[0]
        for box, score, label, mask in zip(pred["boxes"].tolist(), pred["scores"].tolist(),
                                           pred["labels"].tolist(), pred["masks"][:, 0]):
            rle = mask_util.encode(np.asfortranarray((mask > 0.5).cpu().numpy().astype(np.uint8)))
            x1, y1, x2, y2 = box
            results.append({
                "image_id": int(entry["id"]), "category_id": int(label),
                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                "score": round(score, 5),
                "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
            })
    with open(output, "w") as handle:
        json.dump(results, handle, indent=2)
    return results


@torch.no_grad()
def forward_only(checkpoint: Path, test_dir: Path, id_map_json: Path, device: torch.device,
                 overrides: dict[str, Any]) -> None:
    """Checkpoint load, image decode and the bare network (detection, then the mask head on
    every detection; no pasting, no RLE, no JSON): the floor no post-processing goes below."""
    model, _, _ = load_model(checkpoint, overrides)
    stages = MaskRCNNStages(model.to(device).eval())
    for entry in read_id_map(id_map_json, test_dir):
        image = torch.from_numpy(read_image(test_dir / entry["file_name"])).permute(2, 0, 1).to(device)
        state, dets = stages.detect([image], stages.detections_per_img)
        stages.masks(state, [torch.arange(len(dets[0]["scores"]), device=device)])


def agreement(reference: list[dict], results: list[dict]) -> dict[str, Any]:
    """Whether two submissions are identical, and else the share of reference detections
    that have a partner (same image and class, close score, mask IoU >= MATCH_IOU)."""
    if reference == results:
        return {"identical": True, "match_rate": 1.0, "max_score_diff": 0.0}
    matched, score_diffs = 0, []
    for image_id in sorted({r["image_id"] for r in reference}):
        ref = [r for r in reference if r["image_id"] == image_id]
        got = [r for r in results if r["image_id"] == image_id]
        pairs = _match(ref, got)
        matched += len(pairs)
        score_diffs += [abs(ref[i]["score"] - got[j]["score"]) for i, j in pairs]
    return {"identical": False, "match_rate": matched / max(len(reference), 1),
            "max_score_diff": max(score_diffs) if score_diffs else None}


def random_checkpoint(args: argparse.Namespace, path: Path) -> Path:
    """A checkpoint of random weights: with score threshold 0 it still returns the full
    --detections_per_img detections, which is what the pasting and encoding cost depends on."""
    config = {"backbone": args.backbone, "weights": "none", "detections_per_img": args.detections_per_img,
              "input_scale": 0.0}  # the measured images at their native size, as before the fixed scale
    torch.manual_seed(args.seed)
    model = build_model(config)
    save_checkpoint(path, {"model": model.state_dict(), "config": config})
    return path


def summarize(args: argparse.Namespace, device: torch.device, count: int, rows: list[dict]) -> dict[str, Any]:
    columns = ["path", "batch", "amp", "precision", "images_per_s", "seconds", "speedup", "detections", "identical",
               "match_rate"]
    print_table(f"inference: {count} images -> test-results.json, {args.detections_per_img} detections/image",
                rows, columns)
    ours = [r for r in rows if r["path"] == "ours"]
    fp32_b1 = next((r for r in ours if r["batch"] == 1 and not r["amp"]), None)
    best = max(ours, key=lambda r: r["speedup"])
    floor = next(r for r in rows if r["path"] == "forward only")
    targets = {"fp32_batch1_identical": fp32_b1["identical"] if fp32_b1 else None,
               "best_speedup_at_least_1.5x": best["speedup"] >= 1.5,
               "fp32_batch1_speedup_at_least_1.5x": fp32_b1["speedup"] >= 1.5 if fp32_b1 else None}
    print(f"most any post-processing change can give at fp32 (plain loop / forward only): {floor['speedup']:.2f}x")
    print(f"targets met: {targets}")
    return {"benchmark": NAME, "environment": environment(device),
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "rows": rows, "postprocess_bound": floor["speedup"], "targets_met": targets}


def _row(path: str, batch: int, amp: bool, count: int, seconds: float, reference_seconds: float,
         reference: list[dict], results: list[dict]) -> dict[str, Any]:
    agree = agreement(reference, results)
    return {"path": path, "batch": batch, "amp": amp, "images_per_s": count / seconds, "seconds": seconds,
            "speedup": ratio(reference_seconds, seconds), "detections": len(results), **agree}


def _match(ref: list[dict], got: list[dict]) -> list[tuple[int, int]]:
    """Greedy one-to-one pairs (i in ref, j in got), best mask IoU first."""
    if not ref or not got:
        return []
    iou = mask_util.iou([g["segmentation"] for g in got], [r["segmentation"] for r in ref], [0] * len(ref))
    iou = np.asarray(iou).T  # [ref, got]
    same_class = np.array([[r["category_id"] == g["category_id"] for g in got] for r in ref])
    close = np.abs(np.array([r["score"] for r in ref])[:, None] - np.array([g["score"] for g in got])[None]) <= MATCH_SCORE
    iou = np.where(same_class & close & (iou >= MATCH_IOU), iou, -1.0)
    pairs = []
    for flat in np.argsort(-iou, axis=None):
        i, j = np.unravel_index(flat, iou.shape)
        if iou[i, j] < 0:
            break
        pairs.append((int(i), int(j)))
        iou[i, :] = -1.0
        iou[:, j] = -1.0
    return pairs


def make_test_folder(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path]:
    """The test folder and id map: given, made from training images, or generated."""
    if args.test_dir:
        if not args.id_map_json:
            raise SystemExit("--test_dir needs --id_map_json.")
        return Path(args.test_dir), Path(args.id_map_json)
    if args.train_dir:
        test_dir = tmp / "test_release"
        test_dir.mkdir()
        entries = []
        for image_id, sample in enumerate(list_samples(Path(args.train_dir))[: args.images], start=1):
            (test_dir / f"{sample.name}.tif").symlink_to((sample / IMAGE_FILE).resolve())
            height, width = read_image(sample / IMAGE_FILE).shape[:2]
            entries.append({"file_name": f"{sample.name}.tif", "id": image_id, "height": height, "width": width})
        id_map = tmp / "test_image_name_to_ids.json"
        id_map.write_text(json.dumps(entries))
        return test_dir, id_map
    paths = make_dataset(tmp / "data", n_train=0, n_test=args.images, size=tuple(args.size),
                         cells=(args.cells, args.cells + 1), seed=args.seed)
    return paths["test_dir"], paths["id_map_json"]


if __name__ == "__main__":
    main()
