"""Seconds of post-processing per image (mask pasting, tile and view merge, RLE), ours vs the
previous code, and end-to-end ``inference.py`` seconds per image against the network alone.

Post-processing: one 1000x1000 image at the defaults, 25 tiles of 256 px x 1000 detections
(the model's per-view limit at score threshold 0), without and with the 4 flips. The same
generated tile outputs (boxes, scores, labels, 28x28 mask probabilities) are replayed
through ``predictor.predict_images`` (a stand-in for the network answers instantly, so only
post-processing is timed) and through the previous code, kept below as the baseline: masks
pasted one detection at a time, a Python merge loop, one RLE per detection.

End to end (``--end_to_end``): ``inference.py`` on a generated 1000x1000 test image, one view
per tile (``no_tta``), with the 4 flips (``tta``, masks averaged) and with each cell's best copy
kept (``tta+max``, ``--merge max``), from a checkpoint trained at 256 px crops
(random weights unless ``--checkpoint``), the network's share clocked inside the same run; ``--baseline_repo``
times the same command in a checkout of the previous code (``--baseline_modes``).

    python benchmarks/postprocess.py --end_to_end --baseline_repo ../old_checkout
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from faster_coco_eval.core import mask as mask_util  # noqa: E402
from torchvision.models.detection import roi_heads  # noqa: E402

import inference  # noqa: E402
import predictor  # noqa: E402
from benchmarks.common import base_parser, environment, print_table, ratio, setup, timed, write_results  # noqa: E402
from checkpoint import save_checkpoint  # noqa: E402
from coco import detections_to_coco  # noqa: E402
from model import DEFAULT_CONFIG, build_model  # noqa: E402
from synthetic import make_dataset  # noqa: E402
from tiling import tile_grid  # noqa: E402
from tta import FLIPS, View  # noqa: E402

NAME = "postprocess"
ROOT = Path(__file__).resolve().parents[1]


MODES = {"no_tta": [], "tta": ["--tta"], "tta+max": ["--tta", "--merge", "max"]}  # inference.py flags of ours


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__)
    parser.add_argument("--size", type=int, default=1000, help="side of the square image")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--detections", type=int, default=1000, help="detections per tile and view")
    parser.add_argument("--cells", type=int, default=700, help="real cells in the image (the rest is low-score noise)")
    parser.add_argument("--cap", type=int, default=1000, help="--detections_per_img")
    parser.add_argument("--end_to_end", action="store_true", help="also time inference.py end to end")
    parser.add_argument("--end_to_end_size", type=int, default=1000, help="side of its generated test image")
    parser.add_argument("--checkpoint", default=None, help="trained checkpoint for --end_to_end (default: random)")
    parser.add_argument("--baseline_repo", default=None, help="checkout of the previous code for --end_to_end")
    parser.add_argument("--modes", nargs="+", choices=tuple(MODES), default=["no_tta", "tta"],
                        help="tta: the flips, masks averaged (--merge avg, the default with --tta); tta+max: "
                             "each cell's best copy kept")
    parser.add_argument("--baseline_modes", nargs="+", choices=("no_tta", "tta"), default=["no_tta"],
                        help="modes the previous code is timed in (its tta, its default then, runs every flip as a "
                             "full no-TTA pass: about 4x its no_tta time)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = setup(args)
    rows = []
    for flips in (False, True):
        outputs = tile_outputs(args, flips)
        ours, ours_s = timed(lambda: ours_postprocess(outputs, args, flips, device), device)
        base, base_s = timed(lambda: baseline_postprocess(outputs, args), device)
        views = len(outputs)
        rows.append({"views": f"{views} ({'tiles x 4 flips' if flips else 'tiles'})",
                     "detections_in": views * args.detections, "baseline_s": base_s, "ours_s": ours_s,
                     "speedup": ratio(base_s, ours_s), "baseline_kept": len(base), "ours_kept": len(ours),
                     "ours_max_per_image": len(ours)})
    print_table(f"post-processing of one {args.size}x{args.size} image (paste + merge + RLE)", rows,
                ["views", "detections_in", "baseline_s", "ours_s", "speedup", "baseline_kept", "ours_kept"])
    payload = {"benchmark": NAME, "environment": environment(device),
               "settings": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows}
    if args.end_to_end:
        payload["end_to_end"] = end_to_end(args, device)
    write_results(args, NAME, payload)
    return payload


def tile_outputs(args: argparse.Namespace, flips: bool) -> list[dict]:
    """What the network returns for every tile (and flip) of one image: the cells each tile
    sees (their boxes cut at the tile edge), then low-score noise up to ``--detections``."""
    rng = np.random.default_rng(args.seed)
    centres = rng.uniform(0, args.size, (args.cells, 2))
    radii = rng.uniform(5, 14, (args.cells, 2))
    cells = np.concatenate([centres - radii, centres + radii], axis=1).clip(0, args.size)  # x1 y1 x2 y2
    cell_scores = rng.uniform(0.4, 1.0, args.cells)
    outputs = []
    for window in tile_grid(args.size, args.size, args.tile, args.overlap):
        y0, x0, y1, x1 = window
        inside = (cells[:, 0] < x1) & (cells[:, 2] > x0) & (cells[:, 1] < y1) & (cells[:, 3] > y0)
        boxes = cells[inside] - [x0, y0, x0, y0]
        boxes = boxes.clip(0, [x1 - x0, y1 - y0] * 2)
        noise = args.detections - len(boxes)
        corner = rng.uniform(0, [x1 - x0 - 8, y1 - y0 - 8], (noise, 2))
        junk = np.concatenate([corner, corner + rng.uniform(6, 40, (noise, 2))], axis=1).clip(0, [x1 - x0, y1 - y0] * 2)
        for view in (FLIPS if flips else FLIPS[:1]):
            jitter = rng.normal(0, 0.01, len(boxes))
            scores = np.concatenate([cell_scores[inside] + jitter, rng.uniform(0.0, 0.3, noise)]).clip(0, 1)
            all_boxes = torch.from_numpy(np.concatenate([boxes, junk])).float()
            outputs.append({"window": window, "view": View(*view), "scores": torch.from_numpy(scores).float(),
                            "boxes": _flip_boxes(all_boxes, View(*view), (y1 - y0, x1 - x0)),
                            "labels": torch.from_numpy(rng.integers(1, 3, args.detections)),
                            "masks": _blob_masks(args.detections, rng)})
    return outputs


class Replay:
    """The network replaced by recorded tile outputs, in ``predictor.MaskRCNNStages``' interface."""

    def __init__(self, outputs: list[dict], cap: int) -> None:
        self.outputs = iter(outputs)
        self.detections_per_img = cap

    def detect(self, crops: list[torch.Tensor], cap: int, per_class: int = 0) -> tuple[list, list[dict]]:
        views = [next(self.outputs) for _ in crops]
        return [v["masks"] for v in views], [{k: v[k] for k in ("boxes", "scores", "labels")} for v in views]

    def masks(self, state: list, picks: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([m[p.cpu()] for m, p in zip(state, picks)])


def ours_postprocess(outputs: list[dict], args: argparse.Namespace, flips: bool, device: torch.device) -> list[dict]:
    image = torch.zeros(3, args.size, args.size, device=device)
    settings = predictor.Settings(tile=args.tile, tile_overlap=args.overlap, tta_scales=(1.0,) if flips else None,
                                  batch_size=4, detections_per_img=args.cap)
    moved = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in o.items()} for o in outputs]
    merged = predictor.predict_images(Replay(moved, args.cap), [image], settings)[0]
    return detections_to_coco(merged, 1)


def end_to_end(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """inference.py seconds per image, ours (with the network's share) and the previous code's."""
    with tempfile.TemporaryDirectory(prefix="bench_post_") as tmp:
        tmp = Path(tmp)
        side = args.end_to_end_size
        cells = side * side // 1400  # 700 cells on 1000x1000, the density of the task's dense images
        data = make_dataset(tmp / "data", n_train=0, n_test=1, size=(side, side), cells=(cells, cells + 1),
                            seed=args.seed)
        checkpoint = Path(args.checkpoint) if args.checkpoint else _random_checkpoint(tmp / "random.pth", args.seed)
        rows = []
        for mode in args.modes:
            flags = ["--checkpoint", str(checkpoint), "--test_dir", str(data["test_dir"]), "--id_map_json",
                     str(data["id_map_json"]), "--num_workers", "0", "--device", args.device,
                     *(["--no_tta"] if mode == "no_tta" else [])]  # the previous code flipped unless --no_tta
            ours = flags + MODES[mode]
            seconds, network, count = ours_end_to_end(ours + ["--output", str(tmp / f"ours_{mode}.json")], device)
            row: dict[str, Any] = {"mode": mode, "ours_s": seconds, "ours_network_s": network,
                                   "ours_postprocess_share": 1 - network / seconds, "ours_detections": count}
            if args.baseline_repo and mode in args.baseline_modes:
                out = tmp / f"baseline_{mode}.json"
                row["baseline_s"] = _run_inference(Path(args.baseline_repo), flags + ["--output", str(out)])
                row["baseline_detections"] = len(json.loads(out.read_text()))
                row["speedup"] = ratio(row["baseline_s"], seconds)
            rows.append(row)
        print_table(f"inference.py on one {side}x{side} image, seconds", rows,
                    ["mode", "baseline_s", "ours_s", "speedup", "ours_network_s", "ours_postprocess_share",
                     "baseline_detections", "ours_detections"])
        return {"checkpoint": str(args.checkpoint or "random weights, default config, --crop 256"), "rows": rows}


def ours_end_to_end(argv: list[str], device: torch.device) -> tuple[float, float, int]:
    """(seconds, network seconds, detections) of ``inference.main``: the network's stages
    are clocked inside the same run (detection of every view, masks of the candidates)."""
    spent = [0.0]

    class Clocked(predictor.MaskRCNNStages):
        def detect(self, *a: Any) -> Any:
            result, seconds = timed(lambda: super(Clocked, self).detect(*a), device)
            spent[0] += seconds
            return result

        def masks(self, *a: Any) -> Any:
            result, seconds = timed(lambda: super(Clocked, self).masks(*a), device)
            spent[0] += seconds
            return result

    plain, predictor.MaskRCNNStages = predictor.MaskRCNNStages, Clocked
    try:
        path, seconds = timed(lambda: inference.main(argv), device)
    finally:
        predictor.MaskRCNNStages = plain
    return seconds, spent[0], len(json.loads(Path(path).read_text()))


def _run_inference(repo: Path, argv: list[str]) -> float:
    """Seconds of the same inference.py command in another checkout (the previous code)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, str(repo / "inference.py"), *argv], check=True, cwd=repo, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _random_checkpoint(path: Path, seed: int) -> Path:
    """Random weights at the default config, recorded as trained on 256 px crops (so
    inference.py tiles by default); score threshold 0 keeps every view's detections."""
    torch.manual_seed(seed)
    config = {**DEFAULT_CONFIG, "weights": "none"}
    save_checkpoint(path, {"model": build_model(config).state_dict(), "config": config, "args": {"crop": 256}})
    return path


def _flip_boxes(boxes: torch.Tensor, view: View, size: tuple[int, int]) -> torch.Tensor:
    flipped = boxes.clone()
    if view.hflip:
        flipped[:, [0, 2]] = size[1] - boxes[:, [2, 0]]
    if view.vflip:
        flipped[:, [1, 3]] = size[0] - boxes[:, [3, 1]]
    return flipped


def _blob_masks(n: int, rng: np.random.Generator) -> torch.Tensor:
    grid = torch.linspace(-1, 1, 28)
    blob = (1.2 - torch.sqrt(grid[None] ** 2 + grid[:, None] ** 2)).clamp(0, 1)
    return (blob + torch.from_numpy(rng.normal(0, 0.1, (n, 28, 28))).float()).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# Baseline: the previous post-processing, kept verbatim in behaviour (commit e5f2a2d).
# ---------------------------------------------------------------------------------------------

def baseline_postprocess(outputs: list[dict], args: argparse.Namespace) -> list[dict]:
    """Per tile: flips pasted one detection at a time and merged (TTAModel), moved to image
    coordinates; then the image-level merge and one RLE per detection."""
    size = (args.size, args.size)
    by_window: dict[tuple, list[dict]] = {}
    for out in outputs:
        by_window.setdefault(out["window"], []).append(out)
    parts = []
    for window, views in by_window.items():
        y0, x0, y1, x1 = window
        tile_size = (y1 - y0, x1 - x0)
        flipped = [_baseline_back_to_image(v, tile_size) for v in views]
        tile = flipped[0] if len(flipped) == 1 else _baseline_merge(flipped, tile_size)
        parts.append(_baseline_to_image_coords(tile, window, size))
    merged = _baseline_merge(parts, size)
    results = []
    for (x1, y1, x2, y2), score, label, (cx, cy, crop) in zip(merged["boxes"].tolist(), merged["scores"].tolist(),
                                                            merged["labels"].tolist(), merged["crops"]):
        rle = _baseline_rle(crop, cx, cy, *size)
        results.append({"image_id": 1, "category_id": int(label), "score": round(score, 5),
                        "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                        "segmentation": {"size": list(size), "counts": rle["counts"].decode("ascii")}})
    return results


def _baseline_back_to_image(view_out: dict, size: tuple[int, int]) -> dict:
    boxes, masks, view = view_out["boxes"].clone(), view_out["masks"], view_out["view"]
    if view.hflip:
        boxes[:, [0, 2]] = size[1] - boxes[:, [2, 0]]
        masks = masks.flip(-1)
    if view.vflip:
        boxes[:, [1, 3]] = size[0] - boxes[:, [3, 1]]
        masks = masks.flip(-2)
    return {"boxes": boxes, "scores": view_out["scores"], "labels": view_out["labels"],
            "cut": torch.zeros(len(boxes), dtype=torch.bool), "crops": _baseline_mask_crops(masks[:, None], boxes, size)}


def _baseline_mask_crops(masks: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int],
                         mask_thresh: float = 0.5) -> list:
    height, width = image_size
    padded, scale = roi_heads.expand_masks(masks.float(), padding=1)
    expanded = roi_heads.expand_boxes(boxes.float(), scale).to(torch.int64).tolist()
    crops = []
    for mask, (bx0, by0, bx1, by1) in zip(padded, expanded):
        w, h = max(bx1 - bx0 + 1, 1), max(by1 - by0 + 1, 1)
        resized = F.interpolate(mask[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        x0, x1 = max(bx0, 0), min(bx1 + 1, width)
        y0, y1 = max(by0, 0), min(by1 + 1, height)
        crops.append((x0, y0, (resized[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0] > mask_thresh).numpy()))
    return crops


def _baseline_to_image_coords(out: dict, window: tuple[int, int, int, int], image_size: tuple[int, int]) -> dict:
    y0, x0, y1, x1 = window
    boxes = out["boxes"].float() + torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
    inner = torch.tensor([x0 > 0, y0 > 0, x1 < image_size[1], y1 < image_size[0]])
    touches = (boxes - torch.tensor([x0, y0, x1, y1], dtype=torch.float32)).abs() <= 1.0
    return {"boxes": boxes, "scores": out["scores"], "labels": out["labels"], "cut": (touches & inner).any(dim=1),
            "crops": [(cx + x0, cy + y0, crop) for cx, cy, crop in out["crops"]]}


def _baseline_merge(parts: list[dict], image_size: tuple[int, int], match_thresh: float = 0.5) -> dict:
    boxes = torch.cat([p["boxes"] for p in parts])
    scores = torch.cat([p["scores"] for p in parts])
    labels = torch.cat([p["labels"] for p in parts])
    cut = torch.cat([p["cut"] for p in parts])
    crops = [c for p in parts for c in p["crops"]]
    order = sorted(range(len(scores)), key=lambda i: (1, -int(crops[i][2].sum())) if cut[i] else (0, -float(scores[i])))
    neighbours = _baseline_neighbours(boxes)
    kept: list[int] = []
    is_kept = torch.zeros(len(scores), dtype=torch.bool)
    for i in order:
        near = neighbours[i]
        rivals = near[is_kept[near] & (labels[near] == labels[i])].tolist()
        if not any(_baseline_overlap(crops[i], crops[k]) > match_thresh for k in rivals):
            kept.append(i)
            is_kept[i] = True
    kept.sort(key=lambda i: -float(scores[i]))
    index = torch.tensor(kept, dtype=torch.int64)
    return {"boxes": boxes[index], "scores": scores[index], "labels": labels[index], "crops": [crops[i] for i in kept]}


def _baseline_neighbours(boxes: torch.Tensor, chunk: int = 1024) -> list[torch.Tensor]:
    neighbours: list[torch.Tensor] = []
    for start in range(0, len(boxes), chunk):
        rows = boxes[start:start + chunk, None]
        hit = ((rows[..., 0] < boxes[:, 2]) & (boxes[:, 0] < rows[..., 2])
               & (rows[..., 1] < boxes[:, 3]) & (boxes[:, 1] < rows[..., 3]))
        row, col = hit.nonzero(as_tuple=True)
        neighbours.extend(col.split(torch.bincount(row, minlength=len(hit)).tolist()))
    return neighbours


def _baseline_overlap(a: tuple, b: tuple) -> float:
    ax, ay, am = a
    bx, by, bm = b
    x0, y0 = max(ax, bx), max(ay, by)
    x1, y1 = min(ax + am.shape[1], bx + bm.shape[1]), min(ay + am.shape[0], by + bm.shape[0])
    smaller = min(int(am.sum()), int(bm.sum()))
    if x1 <= x0 or y1 <= y0 or smaller == 0:
        return 0.0
    inter = np.logical_and(am[y0 - ay:y1 - ay, x0 - ax:x1 - ax], bm[y0 - by:y1 - by, x0 - bx:x1 - bx]).sum()
    return float(inter) / smaller


def _baseline_rle(crop: np.ndarray, x0: int, y0: int, height: int, width: int) -> dict:
    """Compressed COCO RLE of a full-image mask that is zero outside ``crop`` at (x0, y0):
    runs are computed on the crop only, so the cost does not grow with the image."""
    h, w = crop.shape
    columns = np.zeros((w, h + 2), dtype=np.int8)  # column-major, as COCO RLE counts
    columns[:, 1:-1] = crop.T
    edges = np.diff(columns, axis=1)
    start_col, start_row = np.nonzero(edges == 1)
    end_col, end_row = np.nonzero(edges == -1)
    starts = (x0 + start_col) * height + y0 + start_row
    ends = (x0 + end_col) * height + y0 + end_row
    if len(starts) > 1:  # a run that ends at the bottom row continues at the top of the next column
        joined = starts[1:] == ends[:-1]
        starts = starts[np.concatenate([[True], ~joined])]
        ends = ends[np.concatenate([~joined, [True]])]
    bounds = np.concatenate([[0], np.stack([starts, ends], axis=1).ravel(), [height * width]])
    counts = np.diff(bounds)
    if len(counts) > 1 and counts[-1] == 0:
        counts = counts[:-1]
    return mask_util.frPyObjects({"size": [height, width], "counts": counts.tolist()}, height, width)


if __name__ == "__main__":
    main()
