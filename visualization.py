r"""Ground truth and predictions drawn side by side, saved as one PNG per image.

``--mode val`` draws the validation images of the training run (from the ``split.json``
written next to the checkpoint), so the pictures show images the model never trained on;
``--mode test`` draws predictions only, one PNG per image id. The model is rebuilt from the
checkpoint's config, so no architecture flag is needed; several checkpoints draw what their
ensemble predicts, as ``inference.py --checkpoint A B`` does:
    python visualization.py --checkpoint outputs/resnet101/best.pth --mode val --num_images 5
    python visualization.py --checkpoint outputs/resnet101/best.pth --mode test \
        --test_dir dataset/test_release --id_map_json dataset/test_image_name_to_ids.json
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import PatchCollection  # noqa: E402
from matplotlib.colors import to_hex, to_rgba  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from scipy import ndimage  # noqa: E402
from torch import nn  # noqa: E402

from argtypes import HelpFormatter, chance, non_negative, non_negative_int  # noqa: E402
from checkpoint import load_model, saved_args  # noqa: E402
from cli import run_cli  # noqa: E402
from devices import autocast, default_device  # noqa: E402
from dataloader import (IMAGE_FILE, Instances, UnlabelledImages, decode_instances,  # noqa: E402
                        find_id_map, image_size, list_samples, read_image, read_json)
from errors import DatasetError  # noqa: E402
from files import writable_dir, write_figure  # noqa: E402
from flags import (add_checkpoint_arg, add_checkpoint_checks, add_class_names_arg, add_id_map_arg,  # noqa: E402
                   add_prediction_args, checkpoint_overrides, class_names_for, prediction_settings)
from journal import SUFFIX as JOURNAL_SUFFIX  # noqa: E402
from journal import PredictionJournal, file_stamp, run_key  # noqa: E402
from predictor import Settings, on_host, predict_images  # noqa: E402
from merging import take  # noqa: E402
from progress import progress  # noqa: E402

# Bright colours that stand out on pink/purple stains; more classes cycle through tab10.
CLASS_COLOURS = ("#00ff7f", "#ffd700", "#00bfff", "#ff4500")
FILL_ALPHA = 0.35
PANEL_PIXELS = 1200  # target long side of a panel, so dense images keep their detail
MAX_UPSCALE = 4.0
DPI = 100
FONT_SIZE = 6


@dataclass
class Layer:
    """What one panel draws: boxes and labels, masks stored as crops where they lie (a full
    mask per detection would take gigabytes on a 2000x1400 image with 1000 detections)."""

    title: str
    labels: np.ndarray  # int [N]
    boxes: np.ndarray  # float [N, 4], x1, y1, x2, y2
    masks: list[tuple[int, int, np.ndarray]]  # (x0, y0, bool crop) per instance
    scores: np.ndarray | None = None
    fill: bool = True


Models = nn.Module | Sequence[nn.Module]  # one model, or an ensemble's (predicted like TTA views)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_checkpoint_arg(parser)
    parser.add_argument("--mode", choices=("val", "test"), default="val",
                        help="val: ground truth | prediction of held-out images; test: predictions only")
    parser.add_argument("--num_images", type=non_negative_int, default=5,
                        help="images to draw (0: all); one too large to draw whole is skipped and the next one drawn")
    parser.add_argument("--score_thresh", type=chance, default=0.5, help="draw only detections scoring at least this")
    parser.add_argument("--draw_gt_mask", action="store_true",
                        help="fill ground-truth masks (outlines and boxes are always drawn)")
    parser.add_argument("--vis_dir", default=None,
                        help="where the PNGs go (default: --output_dir, else <the first checkpoint's folder>/vis)")
    parser.add_argument("--output_dir", default=None, help="where the PNGs go unless --vis_dir is given")
    parser.add_argument("--train_dir", default=None,
                        help="folder of the held-out samples (default: the (first) checkpoint's run's --val_dir if "
                             "it had one, else the folder it was trained on)")
    parser.add_argument("--split_json", default=None,
                        help="train/val split (default: split.json next to the first checkpoint)")
    parser.add_argument("--test_dir", default=None,
                        help="test folder (default: the (first) checkpoint's run's, else dataset/test_release)")
    add_id_map_arg(parser, writes_submission=False)  # --mode test; without --test_dir, the checkpoint's run's map comes first
    parser.add_argument("--max_labels", type=non_negative_int, default=150,
                        help="most class:score labels per image, best first (0: no labels, the cells still drawn)")
    parser.add_argument("--min_label_side", type=non_negative, default=8.0,
                        help="no label on boxes with a side below this (image pixels)")
    add_class_names_arg(parser, "the figures' legends")
    add_prediction_args(parser)  # inference.py's, so a figure shows what a submission predicted
    add_checkpoint_checks(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    device = default_device(args.device)
    overrides = checkpoint_overrides(args)
    loaded = [load_model(Path(path), overrides) for path in args.checkpoint]
    model = [net.to(device).eval() for net, _, _ in loaded]  # several: an ensemble, merged like views
    state = loaded[0][2]
    args.settings = prediction_settings(args).resolved(device, state)
    args.class_names = class_names_for(args.class_names, saved_args(state).get("class_names"),
                                       loaded[0][1]["num_classes"])
    vis_dir = writable_dir(args.vis_dir or args.output_dir or Path(args.checkpoint[0]).parent / "vis",
                           "--vis_dir" if args.vis_dir else "--output_dir")
    draw = draw_validation if args.mode == "val" else draw_test
    paths, shown = draw(model, saved_args(state), args, device, vis_dir)
    gt = f"{shown['gt']} ground-truth instances, " if args.mode == "val" else ""
    print(f"{args.mode}: wrote {len(paths)} PNG(s) to {vis_dir}; {gt}{shown['pred']} predictions "
          f"with score >= {args.score_thresh:g}")
    return paths


def draw_validation(model: Models, train_args: dict[str, Any], args: argparse.Namespace, device: torch.device,
                    vis_dir: Path) -> tuple[list[Path], dict[str, int]]:
    """Ground truth | prediction for the held-out images of the training run."""
    split_json = Path(args.split_json or Path(args.checkpoint[0]).parent / "split.json")
    split = validation_split(split_json)
    for other in args.checkpoint[1:]:
        warn_trained_on(split["val"], Path(other))
    train_dir = args.train_dir or split.get("val_dir") or train_args.get("train_dir")
    if not train_dir:
        raise DatasetError(f"{args.checkpoint[0]}: the checkpoint does not name its training folder; pass --train_dir.")
    samples = {p.name: p for p in list_samples(Path(train_dir))}
    missing = [n for n in split["val"] if n not in samples]
    if missing:
        raise DatasetError(f"{train_dir}: validation sample(s) {missing[:5]} from {split_json} are missing; "
                           "pass the --train_dir the model was trained on.")
    names = _first_drawable(split["val"], args.num_images, lambda name: samples[name] / IMAGE_FILE)
    paths = [vis_dir / f"{name}.png" for name in names]

    def draw(i: int) -> dict[str, int]:
        image = read_image(samples[names[i]] / IMAGE_FILE)
        gt = ground_truth_layer(decode_instances(samples[names[i]], image.shape[:2]), args.draw_gt_mask)
        pred = predict_layer(model, image, device, args.score_thresh, args.settings)
        gt.title = f"{names[i]}: ground truth, {len(gt.labels)} instances"
        save_figure(image, [gt, pred], paths[i], args)
        return {"gt": len(gt.labels), "pred": len(pred.labels)}

    return paths, draw_all(paths, draw, drawing_key(args, [samples[n] / IMAGE_FILE for n in names]), vis_dir, "draw val")


def draw_test(model: Models, train_args: dict[str, Any], args: argparse.Namespace, device: torch.device,
              vis_dir: Path) -> tuple[list[Path], dict[str, int]]:
    """Predictions on test images, each PNG named by its submission image id."""
    test_dir = args.test_dir or train_args.get("test_dir") or "dataset/test_release"
    runs_folder = train_args.get("test_dir") and Path(train_args["test_dir"]).resolve() == Path(test_dir).resolve()
    # the run's id map belongs to the run's test folder, not to another one given here
    id_map = find_id_map(Path(test_dir), args.id_map_json or (train_args.get("id_map_json") if runs_folder else None))
    dataset = UnlabelledImages(Path(test_dir), id_map)
    indices = _first_drawable(list(range(len(dataset))), args.num_images,
                              lambda i: dataset.test_dir / dataset.entries[i]["file_name"])
    entries = [dataset.entries[i] for i in indices]
    paths = [vis_dir / f"{entry['id']}.png" for entry in entries]

    def draw(i: int) -> dict[str, int]:
        tensor, meta = dataset[indices[i]]
        image = tensor.permute(1, 2, 0).numpy()
        pred = predict_layer(model, image, device, args.score_thresh, args.settings)
        pred.title = f"{meta['file_name']} (id {meta['image_id']}): {pred.title}"
        save_figure(image, [pred], paths[i], args)
        return {"gt": 0, "pred": len(pred.labels)}

    images = [dataset.test_dir / e["file_name"] for e in entries]
    return paths, draw_all(paths, draw, drawing_key(args, images, [e["id"] for e in entries]), vis_dir, "draw test")


# The record of a drawing run's finished images (journal.py) in the PNGs' folder: the same command
# after a crash or a Ctrl-C draws only the images still missing. Deleted once every image is drawn.
RECORD = f".drawing{JOURNAL_SUFFIX}"


def drawing_key(args: argparse.Namespace, images: list[Path], names: list[int] | None = None) -> str:
    """What makes two drawing runs' PNGs interchangeable: the checkpoints and the images as they
    are on disk, the PNGs' names, and every setting that changes a figure (how it computes,
    batch size, AMP, device, not)."""
    return run_key(args.checkpoint, mode=args.mode, names=names,
                   images=[(str(Path(p).resolve()), *file_stamp(p)) for p in images],
                   score_thresh=args.score_thresh, draw_gt_mask=args.draw_gt_mask, max_labels=args.max_labels,
                   min_label_side=args.min_label_side, settings=args.settings.what_it_predicts(),
                   overrides=checkpoint_overrides(args), class_names=list(args.class_names))


def draw_all(paths: list[Path], draw: Callable[[int], dict[str, int]], key: str, vis_dir: Path,
             desc: str) -> dict[str, int]:
    """``draw(i)`` writes ``paths[i]`` and returns what it showed; the images an earlier run of
    the same command finished (recorded, and their PNG still there) are not drawn again. Returns
    the instances shown over all the images, the earlier run's included."""
    shown = {"gt": 0, "pred": 0}
    with PredictionJournal(vis_dir / RECORD, key) as record:
        earlier = {i for i in record.done if i < len(paths) and paths[i].is_file()}
        if earlier:
            print(f"{len(earlier)} of {len(paths)} image(s) were drawn by this command before it stopped; "
                  f"drawing the other {len(paths) - len(earlier)} ({record.path}; delete it to draw all again)")
        for part in record.replay(earlier):
            shown = {k: shown[k] + part[0][k] for k in shown}
        for i in progress([i for i in range(len(paths)) if i not in earlier], desc, total=len(paths),
                          initial=len(earlier)):
            counts = draw(i)
            shown = {k: shown[k] + counts[k] for k in shown}
            record.add(i, [counts])
            record.finish(i)
    record.discard()  # every image is drawn
    return shown


# A figure shows a whole image; one over this side (a whole slide) is skipped with a note, not read
# whole into memory (inference.py streams such images; QuPath draws its GeoJSON).
MAX_DRAWN_SIDE = 4096


def drawable(path: Path) -> bool:
    """Whether an image is small enough to draw whole (its header read only); else a note says why not."""
    height, width = image_size(path)
    if max(height, width) <= MAX_DRAWN_SIDE:
        return True
    print(f"note: {path}: {height} x {width} px, too large to draw whole (over {MAX_DRAWN_SIDE} px a side); skipped. "
          "Open the GeoJSON of inference.py --save_geojson in QuPath to see its cells.")
    return False


def validation_split(split_json: Path) -> dict[str, Any]:
    """split.json with its held-out names (``val``) and, for a run given ``--val_dir``, that folder."""
    if not split_json.is_file():
        raise FileNotFoundError(f"{split_json}: not found; training writes split.json next to its checkpoints. "
                                "Pass --split_json, or draw test images with --mode test.")
    split = read_json(split_json, "pass the split.json training wrote")
    if not isinstance(split, dict):
        raise DatasetError(f"{split_json}: not a split.json (expected an object with \"val\"); pass the one "
                           "training wrote beside its checkpoints.")
    if not split.get("val"):
        raise DatasetError(f"{split_json}: no validation images (trained with --val_split 0?); use --mode test.")
    return split


def warn_trained_on(names: list[str], checkpoint: Path) -> None:
    """A note where an ensemble's other run trained on some of the held-out images drawn (from
    the split.json beside its checkpoint): its part of the figure is then no held-out result."""
    theirs = checkpoint.parent / "split.json"
    if not theirs.is_file():
        return
    held = read_json(theirs, "pass the split.json training wrote")
    held = set(held.get("val") or []) if isinstance(held, dict) else set()
    seen = [name for name in names if name not in held]
    if seen:
        print(f"note: {len(seen)} of the {len(names)} held-out images were training images of {checkpoint}'s run "
              f"({theirs}), e.g. {seen[0]}; the ensemble's figures of them are not held-out results")


def ground_truth_layer(instances: Instances, fill: bool) -> Layer:
    masks = [(int(x1), int(y1), crop) for (x1, y1, _, _), crop in zip(instances.boxes, instances.crops)]
    return Layer("ground truth", instances.labels, instances.boxes.astype(np.float32), masks, fill=fill)


@torch.no_grad()
def predict_layer(model: Models, image: np.ndarray, device: torch.device, score_thresh: float,
                  settings: Settings = Settings()) -> Layer:
    """Detections scoring at least ``score_thresh``, predicted as the submission is
    (``predictor.predict_images``: tile by tile when ``settings.tile`` > 0, the same cap; a
    list of models is an ensemble)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).to(device)
    with autocast(device, settings.use_amp):
        output = on_host(predict_images(model, [tensor], settings))[0]  # host sync: once per image
    keep = (output["scores"] >= score_thresh).nonzero().flatten()  # on the host from here: drawing is per cell anyway
    packed = take(output["masks"], keep)
    masks = [(int(packed.boxes[i, 0]), int(packed.boxes[i, 1]), packed.crop(i).numpy().astype(bool))
             for i in range(len(packed))]
    scores = output["scores"][keep].numpy()
    title = f"prediction, {len(scores)} with score >= {score_thresh:g}"
    return Layer(title, output["labels"][keep].numpy(), output["boxes"][keep].numpy(), masks, scores=scores)


def save_figure(image: np.ndarray, layers: list[Layer], path: Path, args: argparse.Namespace) -> Path:
    """Panels side by side at a fixed pixel scale, so label placement can be planned in pixels."""
    height, width = image.shape[:2]
    scale = min(max(PANEL_PIXELS / max(height, width), 1.0), MAX_UPSCALE)
    panel_w, panel_h, gap, top, bottom = width * scale / DPI, height * scale / DPI, 0.1, 0.3, 0.35
    fig_w, fig_h = len(layers) * (panel_w + gap) + gap, panel_h + top + bottom
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=DPI)
    for i, layer in enumerate(layers):
        ax = fig.add_axes(((gap + i * (panel_w + gap)) / fig_w, bottom / fig_h, panel_w / fig_w, panel_h / fig_h))
        draw_layer(ax, image, layer, scale, args)
    write_figure(fig, path, dpi=DPI, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)
    return path


def draw_layer(ax: plt.Axes, image: np.ndarray, layer: Layer, scale: float, args: argparse.Namespace) -> None:
    """One panel; limits pinned to the image so boxes at the border never rescale it."""
    ax.imshow(image, interpolation="nearest")
    ax.imshow(mask_overlay(layer, image.shape[:2]), interpolation="nearest")
    colours = [class_colour(int(c)) for c in layer.labels]
    rects = [Rectangle((x1, y1), x2 - x1, y2 - y1) for x1, y1, x2, y2 in layer.boxes]
    ax.add_collection(PatchCollection(rects, facecolor="none", edgecolor=colours, linewidth=0.5, alpha=0.8),
                      autolim=False)
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(image.shape[0] - 0.5, -0.5)
    if layer.scores is not None:
        _draw_labels(ax, layer, scale, args.max_labels, args.min_label_side)
    ax.set_title(layer.title, fontsize=9)
    ax.set_axis_off()
    classes = sorted({*np.unique(layer.labels).tolist(), *range(1, len(args.class_names) + 1)})
    names = dict(enumerate(args.class_names, start=1))
    handles = [Patch(facecolor=class_colour(c), label=f"{names.get(c, f'class{c}')} ({int((layer.labels == c).sum())})")
               for c in classes]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles), fontsize=7,
              frameon=False, handlelength=1.0, columnspacing=1.0)


def mask_overlay(layer: Layer, shape: tuple[int, int]) -> np.ndarray:
    """RGBA image of all masks: translucent fill (if asked) and opaque one-pixel outlines,
    outlines drawn last so touching cells stay separable."""
    overlay = np.zeros((*shape, 4), dtype=np.float32)
    rgba = [np.array(to_rgba(class_colour(int(c))), dtype=np.float32) for c in layer.labels]
    if layer.fill:
        for (x0, y0, crop), colour in zip(layer.masks, rgba):
            h, w = crop.shape
            overlay[y0:y0 + h, x0:x0 + w][crop] = (*colour[:3], FILL_ALPHA)
    for (x0, y0, crop), colour in zip(layer.masks, rgba):
        h, w = crop.shape
        overlay[y0:y0 + h, x0:x0 + w][_outline(crop)] = colour
    return overlay


def class_colour(label: int) -> str:
    """The same colour for a class in every panel, legend and label."""
    if 1 <= label <= len(CLASS_COLOURS):
        return CLASS_COLOURS[label - 1]
    return to_hex(plt.get_cmap("tab10")(label % 10))


def _draw_labels(ax: plt.Axes, layer: Layer, scale: float, max_labels: int, min_side: float) -> None:
    """``c<class>:<score>`` above boxes, best scores first, skipping small boxes and any label
    that would overlap one already placed: dense images stay readable."""
    char_w = 0.62 * FONT_SIZE * DPI / 72 / scale  # image pixels per character
    text_h = 1.3 * FONT_SIZE * DPI / 72 / scale
    placed: list[tuple[float, float, float, float]] = []
    for i in np.argsort(-layer.scores):
        if len(placed) >= max_labels:
            break
        x1, y1, x2, y2 = layer.boxes[i]
        if min(x2 - x1, y2 - y1) < min_side:
            continue
        text = f"c{int(layer.labels[i])}:{layer.scores[i]:.2f}"
        rect = (x1, y1 - text_h, x1 + len(text) * char_w, y1)
        if any(_overlaps(rect, other) for other in placed):
            continue
        placed.append(rect)
        ax.text(x1, y1, text, fontsize=FONT_SIZE, va="bottom", ha="left", color="black", clip_on=True,
                bbox={"facecolor": class_colour(int(layer.labels[i])), "alpha": 0.7, "pad": 0.5, "linewidth": 0})


def _outline(crop: np.ndarray) -> np.ndarray:
    inner = ndimage.binary_erosion(np.pad(crop, 1))[1:-1, 1:-1]
    return crop & ~inner


def _overlaps(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _first_drawable(items: list, n: int, path: Callable[[Any], Path]) -> list:
    """The first ``n`` (0: all) of ``items`` whose image (``path``) can be drawn whole: one too
    large is skipped (with a note) and the next one taken."""
    chosen: list = []
    for item in items:
        if 0 < n <= len(chosen):
            break
        if drawable(path(item)):
            chosen.append(item)
    return chosen


if __name__ == "__main__":
    run_cli(main)
