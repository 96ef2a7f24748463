"""Flags that more than one script reads, each declared once: the device, how images are
predicted (training's validation, inference.py, visualization.py), and the argparse types
that range-check a value when it is read, so a bad one stops with argparse's one-line error
and exit status 2 before any work, never with a traceback later.
"""
from __future__ import annotations

import argparse
from typing import Any, Sequence

import torch

from argtypes import chance, non_negative, non_negative_int, positive, positive_int, probability, share
from dataloader import ID_MAP_FILE, NUM_CLASSES, num_classes_arg
from devices import GPU_BATCH
from errors import UsageError
from model import DEFAULT_CONFIG, backbone_name, scale_factor
from predictor import Settings

TTA_SCALES = (1.0,)  # --tta's views: the flips at the input scale
DEFAULT_CLASS_NAMES = [f"class{c}" for c in range(1, NUM_CLASSES + 1)]


def device_name(text: str) -> str:
    """An argparse type for ``--device``: a CPU or a CUDA device this machine has, so ``--device gpu``
    or ``--device cuda:3`` on a one-GPU machine stops while parsing, not as a traceback at the first
    ``.to(device)``."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r} is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no usable CUDA GPU; use cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return str(device)


def add_device_args(parser: argparse.ArgumentParser | Any) -> None:
    """--device and --use_amp, for training and prediction alike."""
    parser.add_argument("--device", type=device_name, default=None,
                        help="cuda, cuda:1, cpu (default: CUDA when present)")
    parser.add_argument("--use_amp", action="store_true",
                        help="mixed precision: fp16 on CUDA (with a gradient scaler when training), bf16 on a CPU "
                             "with bf16 instructions (AVX512-BF16 or AMX); float32 on other CPUs, where bf16 is "
                             "several times slower (said once)")


def add_tile_args(parser: argparse.ArgumentParser | Any) -> None:
    """--tile and --tile_overlap: how images larger than the training crop are predicted."""
    parser.add_argument("--tile", type=non_negative_int, default=None,
                        help="predict images larger than this tile by tile, each tile scaled like a training crop "
                             "(0: whole images; default: the training run's --crop, the context the model knows, or "
                             "the --tile that run was given)")
    parser.add_argument("--tile_overlap", type=share, default=0.25,
                        help="overlap of neighbouring tiles as a share of --tile, in [0, 1); make it exceed the "
                             "largest cell")


def add_prediction_args(parser: argparse.ArgumentParser) -> None:
    """Every flag of ``predictor.Settings`` plus the device, for the tools that predict from a
    checkpoint (inference.py, visualization.py)."""
    group = parser.add_argument_group("prediction")
    add_device_args(group)
    add_tile_args(group)
    group.add_argument("--batch_size", type=positive_int, default=None,
                       help=f"tiles x TTA views per forward pass, of one image or of several small ones of one "
                            f"size (default: {GPU_BATCH} on a GPU, 1 on a CPU); whole images (--tile 0), padded "
                            "together, only when given")
    group.add_argument("--tta", nargs="?", const="flips", default=None, choices=("flips", "dihedral"),
                       help="test-time augmentation, merged with the tiles: 'flips' (the value when none is given), "
                            "the 4 flips x --tta_scales, or 'dihedral', each also turned by 90 degrees (8 views); "
                            "the time grows with the views (default: off, one view)")
    group.add_argument("--no_tta", action="store_true",
                       help="one view per image even where --tta or --tta_scales is given (without them: the default)")
    group.add_argument("--tta_scales", type=positive, nargs="+", default=None,
                       help=f"image scales of --tta's views (default: {' '.join(map(str, TTA_SCALES))}); given "
                            "alone, it turns --tta on; with --tile 0 a view past --max_size is shrunk to it, so "
                            "on large whole images the scales differ only by resampling: use tiles")
    group.add_argument("--merge", choices=("max", "avg"), default=None,
                       help="a cell found by several views or models: 'max' keeps the mask of its best-scoring "
                            "copy; 'avg' averages the mask probabilities of its whole copies (not cut by a tile "
                            "edge, same class, box IoU > 0.5), the best-scoring one of each other view and model "
                            "(more mask-head work; tiles of one view count once). Default: avg with --tta, max "
                            "otherwise")
    group.add_argument("--vote_boost", type=non_negative, default=0.0,
                       help="a cell found by k of the views and models scores its score (the mean over views and "
                            "models where --consensus is on, by default with --tta; else its best copy's) x "
                            "(1 + b (k - 1)); tiles of one view count once (0: no boost)")
    group.add_argument("--consensus", action="store_const", const=True, default=None,
                       help="with --tta or an ensemble: a cell's score is the mean over every view and model of "
                            "its class's probability there (its best copy of that class in each, 0 where one found "
                            "none), not its best copy's, so a class the views agree on outranks one a single view "
                            "was sure of. It re-ranks the cells the caps chose by their best copy; --vote_boost, "
                            "a --mask_iou model's predicted IoU and --class_context multiply onto it; no effect "
                            "with one view of one model (default: on with --tta, off for an ensemble's one view)")
    group.add_argument("--no_consensus", dest="consensus", action="store_const", const=False,
                       help="a cell scores its best copy's probability, even with --tta")
    group.add_argument("--class_context", type=non_negative, default=0.0, metavar="STRENGTH",
                       help="move each cell's score between its class hypotheses toward the classes the cells "
                            "around it are detected as (a Bayes update with the neighbours' classes as the prior, "
                            "to this power): cell types cluster in tissue, the classifier sees only the cell (0: off)")
    group.add_argument("--class_context_reach", type=positive, default=3.0, metavar="SIDES",
                       help="with --class_context: how far the neighbours count, in sides of the cell's box (a "
                            "Gaussian weight of the distance between box centres)")
    group.add_argument("--mask_thresh", type=probability, default=0.5,
                       help="a pixel belongs to a cell when its mask probability exceeds this (torchvision: 0.5)")
    add_limit_args(group, from_checkpoint=True)


def add_limit_args(parser: argparse.ArgumentParser | Any, from_checkpoint: bool) -> None:
    """How many detections an image keeps: a train script's defaults (recorded in the
    checkpoint), or with ``from_checkpoint`` an override of the checkpoint's at prediction."""
    theirs = "the checkpoint's (an ensemble: the smallest of its checkpoints')"
    img, cls = ((theirs, theirs) if from_checkpoint
                else (DEFAULT_CONFIG["detections_per_img"], DEFAULT_CONFIG["detections_per_class"]))
    parser.add_argument("--detections_per_img", type=non_negative_int, default=None if from_checkpoint else img,
                        help=f"most detections kept per image, after the tile and TTA merges and the class cap "
                             f"(without a class cap, chosen by score before --consensus, --vote_boost or "
                             f"--class_context rescore) (0: every one, for "
                             f"whole slides; default: {img}); each tile or view keeps at most what its area can "
                             "hold, one cell per square of the smallest anchor side, and only the image's best get "
                             "masks")
    parser.add_argument("--detections_per_class", type=non_negative_int, default=None if from_checkpoint else cls,
                        help="most detections kept per image and class, within --detections_per_img: COCO's "
                             f"maxDets counts per image and class, so a frequent class cannot crowd a rare one "
                             f"out (0: no class limit; default: {cls})")


def add_checkpoint_arg(parser: argparse.ArgumentParser | Any) -> None:
    """--checkpoint: one run's weights, or several predicted as one ensemble (predictor.py merges
    the models like TTA views), so a figure can show what an ensemble's submission holds."""
    parser.add_argument("--checkpoint", required=True, nargs="+",
                        help="best.pth or last.pth written by a train script; several: an ensemble, any backbones, "
                             "merged like TTA views (the first one's run gives the defaults read from a run)")


def add_id_map_arg(parser: argparse.ArgumentParser | Any, writes_submission: bool = True) -> None:
    """--id_map_json: which id each predicted image has in the submission (in visualization.py,
    which writes none: in the PNGs' names)."""
    numbered = (f"and that map is written beside the submission as {ID_MAP_FILE}, never over a map of other images"
                if writes_submission else "which name the PNGs")
    runs = "" if writes_submission else "for the training run's own test folder, the map that run was given; else "
    parser.add_argument("--id_map_json", default=None,
                        help="list of {file_name, id, height, width} naming each test image's id (default: "
                             f"{runs}{ID_MAP_FILE} beside --test_dir where it names any of that folder's images, and "
                             f"then it must name exactly them; else the images sorted by name get ids 1..N, {numbered})")


def add_class_names_arg(parser: argparse.ArgumentParser | Any, shown_in: str = "the per-cell outputs") -> None:
    """--class_names: what classes 1, 2, ... are called in ``shown_in``; training records them."""
    parser.add_argument("--class_names", nargs="+", default=None, metavar="NAME",
                        help=f"names of classes 1, 2, ... in {shown_in}, one per class of the model (--num_classes "
                             "less the background), e.g. epithelial lymphocyte neutrophil macrophage (default: those "
                             f"the (first) checkpoint's run was given, else {' '.join(DEFAULT_CLASS_NAMES)}, as many "
                             "as it has classes)")


def class_names_for(given: Sequence[str] | None, saved: Sequence[str] | None, num_classes: int) -> list[str]:
    """The names of a model's classes 1..num_classes-1: those typed, else its run's, else the
    defaults. Typed names of another count stop here, in one line, not at the first cell of a
    class without a name minutes into prediction. A run's own names are fitted to its classes
    instead (runs before ``nargs="+"`` had to give four, whatever their classes)."""
    count = num_classes - 1
    if not given:
        names = list(saved or [])[:count]
        return names + DEFAULT_CLASS_NAMES[len(names):count]
    if len(given) != count:
        raise UsageError(f"--class_names: {len(given)} names ({' '.join(given)}) for a model of {count} classes "
                         f"(--num_classes {num_classes} counts the background); pass one name per class, class 1 "
                         "first.")
    return list(given)


def validation_settings(args: argparse.Namespace) -> Settings:
    """How training predicts its held-out images and, at the end, a test folder: one view, tiles
    of ``--tile``, batches of ``--batch_size``."""
    return Settings(tile=args.tile, tile_overlap=args.tile_overlap, batch_size=args.batch_size, use_amp=args.use_amp)


def prediction_settings(args: argparse.Namespace) -> Settings:
    """The ``Settings`` the flags of ``add_prediction_args`` ask for (``None`` fields are
    decided later from the device and checkpoint: ``Settings.resolved``)."""
    one_view = args.no_tta or (args.tta is None and args.tta_scales is None)
    scales = None if one_view else tuple(args.tta_scales or TTA_SCALES)
    return Settings(tile=args.tile, tile_overlap=args.tile_overlap, tta_scales=scales, mask_thresh=args.mask_thresh,
                    batch_size=args.batch_size, use_amp=args.use_amp, detections_per_img=args.detections_per_img,
                    detections_per_class=args.detections_per_class,
                    dihedral=not one_view and args.tta == "dihedral", vote_boost=args.vote_boost, merge=args.merge,
                    consensus=args.consensus,
                    class_context=args.class_context, context_reach=args.class_context_reach)


def add_checkpoint_checks(parser: argparse.ArgumentParser) -> None:
    """Architecture flags a tool that loads a checkpoint accepts only to check them against it
    (the checkpoint knows its architecture), and the input and score settings it may override,
    so ``visualization.py`` draws what ``inference.py`` submitted with the same flags."""
    group = parser.add_argument_group("model (the checkpoint knows it)")
    group.add_argument("--backbone", type=backbone_name, default=None,
                       help="resnet or effnet, only checked against each checkpoint")
    group.add_argument("--use_attn", action="store_true", help="only checked against each checkpoint")
    group.add_argument("--num_classes", type=num_classes_arg, default=None, help="only checked against each checkpoint")
    group.add_argument("--min_size", type=positive_int, default=None,
                       help="override the checkpoint's shorter side (only where its --input_scale is 0)")
    group.add_argument("--max_size", type=positive_int, default=None, help="override the checkpoint's longest side")
    group.add_argument("--box_score_thresh", type=chance, default=None,
                       help="override the checkpoint's: detections scoring below it are dropped inside the model, "
                            "before any merge (unlike --score_thresh, which filters what is kept). Raising it "
                            "(e.g. 0.3) makes a streamed whole slide much faster on a CPU; AP prefers 0")
    group.add_argument("--input_scale", type=scale_factor, default=None,
                       help="override the checkpoint's fixed input scale (cells look their best at the training one)")


def checkpoint_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """What ``checkpoint.load_model`` checks or overrides, from ``add_checkpoint_checks`` and
    the caps of ``add_prediction_args`` (None: the checkpoint's)."""
    return {"backbone": args.backbone, "use_attn": True if args.use_attn else None, "num_classes": args.num_classes,
            "min_size": args.min_size, "max_size": args.max_size, "input_scale": args.input_scale,
            "detections_per_img": args.detections_per_img, "detections_per_class": args.detections_per_class,
            "box_score_thresh": args.box_score_thresh}
