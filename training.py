"""A training run, shared by both train scripts: the flags, the data split and loaders, the
model and its optimisation, resume, and the epoch loop around ``engine.run_epoch`` with
``best.pth`` on improvement, ``last.pth`` and one ``history.json`` row every epoch, early
stop, and prediction of a test folder at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, Subset

from argtypes import HelpFormatter, non_negative, non_negative_int, positive_int, share
from augment import Donors, add_augment_args, build_crop_window, build_train_transforms
from checkpoint import (build_checkpoint, link_checkpoint, load_checkpoint, load_weights, save_checkpoint, saved_args,
                        set_rng_state)
from coco import build_coco_gt
from dataloader import (ID_MAP_FILE, LabelledImages, UnlabelledImages, collate_fn, few, find_id_map, list_samples,
                        sample_groups, split_samples, write_split)
from devices import amp_dtype, precision
from distributed import (DistInfo, StopRequest, any_rank, broadcast, cleanup, decorrelate_ranks, epoch_samples_done,
                         ignore_stop_signals, init_distributed, samples_trained)
from ema import ModelEMA
from engine import EpochMeter, run_epoch
from errors import EXPECTED_ERRORS, CheckpointError, DatasetError, DeviceMemoryError, DivergenceError, UsageError
from files import set_aside, writable_dir
from flags import (add_class_names_arg, add_device_args, add_id_map_arg, add_limit_args,
                   add_tile_args, class_names_for, validation_settings)
from history import CURVE_FILES, recorded_epochs, write_history
from model import ARCH_KEYS, HEADS, add_model_args, arch_flags, build_model, config_from_args, saved_config
from inference import predict_folder
from journal import SUFFIX as JOURNAL_SUFFIX
from optimisation import LRSchedule, Optimisation, enable_tf32, fused_adamw
from sampling import SeededDraws, balanced_class_weights, class_repeat_factors, train_sampler

SELECT_METRICS = tuple(f"{t}_{m}" for t in ("segm", "bbox") for m in ("AP50", "AP", "AP75"))


EXIT_INTERRUPTED = 3  # exit status of a run stopped by SIGTERM/Ctrl-C after saving last.pth


def build_parser(backbone: str, description: str) -> argparse.ArgumentParser:
    """All training flags; the backbone-specific defaults come from the calling script."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    data = parser.add_argument_group("data and outputs")
    data.add_argument("--train_dir", default="dataset/train", help="folder of <sample>/image.tif + classN.tif")
    data.add_argument("--test_dir", default=None, help="test folder, predicted after training when given")
    add_id_map_arg(data)
    add_class_names_arg(data)
    data.add_argument("--output_dir", default=f"outputs/{backbone}", help="checkpoints, history and split go here")
    data.add_argument("--val_split", type=share, default=0.2,
                      help="share of samples held out for validation (of groups with --split_groups; unused with "
                           "--val_dir)")
    data.add_argument("--seed", type=int, default=42, help="seed of the split, the init and the augmentation")
    data.add_argument("--split_seed", type=int, default=None,
                      help="seed of the split alone (default: --seed), to compare seeds on the same held-out images")
    data.add_argument("--split_groups", default=None, metavar="MANIFEST_OR_REGEX",
                      help="hold out whole groups of samples (patches of one slide): a JSON manifest of "
                           "{name, source_image}, or a regex whose first group names a sample's group; "
                           "--val_split is then the share of groups")
    data.add_argument("--val_dir", default=None,
                      help="validate on this folder (training layout) instead of holding out part of --train_dir, "
                           "which then trains whole")
    data.add_argument("--num_workers", type=non_negative_int, default=2, help="DataLoader worker processes")
    data.add_argument("--no_cache_images", action="store_true",
                      help="decode each image on every access instead of keeping the decoded images in memory "
                           "(they are kept in their stored dtype: 3 bytes a pixel for 8-bit RGB)")
    data.add_argument("--class_balance", action="store_true",
                      help="weigh each RoI's classification loss by 1 / sqrt(its class's share of the training "
                           "instances), normalised to a mean of 1: rare classes count more (off by default)")
    data.add_argument("--repeat_thresh", type=non_negative, default=0.0,
                      help="repeat-factor sampling: images with classes in fewer than this share of images "
                           "repeat up to sqrt(t/f) times per epoch (0 disables)")
    data.add_argument("--demo", action="store_true",
                      help="write a small synthetic dataset into --output_dir (untyped: outputs/demo_<its "
                           "default's name>, e.g. outputs/demo_resnet101) and run train + predict on it (it replaces "
                           "--train_dir, --test_dir and --id_map_json; the flags you type override its budget)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=positive_int, default=40, help="training epochs")
    optim.add_argument("--batch_size", type=positive_int, default=2,
                       help="training images per step and rank; also the tiles a pass when training predicts its "
                            "held-out images and --test_dir")
    optim.add_argument("--lr", type=non_negative, default=2e-4, help="AdamW peak learning rate")
    optim.add_argument("--weight_decay", type=non_negative, default=1e-4, help="AdamW weight decay")
    optim.add_argument("--warmup_epochs", type=non_negative, default=5, help="linear warm-up from 0, per step")
    optim.add_argument("--use_cosine", action="store_true",
                       help="cosine decay to --eta_min after warm-up (default: ReduceLROnPlateau on --select_metric)")
    optim.add_argument("--eta_min", type=non_negative, default=5e-6, help="--use_cosine's final learning rate")
    optim.add_argument("--clip_grad", type=non_negative, default=10.0, help="max gradient norm (0 disables)")
    optim.add_argument("--ema_decay", type=share, default=0.0,
                       help="keep an exponential moving average of the weights, scored beside them; a decay in "
                            "[0, 1) (0 disables)")
    add_device_args(optim)
    run = parser.add_argument_group("checkpoints and selection")
    run.add_argument("--select_metric", choices=SELECT_METRICS, default="segm_AP50",
                     help="validation metric that picks best.pth (the competition scores segm AP50)")
    run.add_argument("--eval_every", type=positive_int, default=1,
                     help="validate every N epochs and after the last (best.pth is chosen among validated epochs)")
    run.add_argument("--eval_max_dets", type=positive_int, default=100,
                     help="COCOeval maxDets (pycocotools' default 100 is what leaderboards use)")
    add_tile_args(run)
    run.add_argument("--resume", default=None,
                     help="last.pth to continue a run: its weights, optimizer, schedule, history and flags; a flag "
                          "typed now overrides the run's own (--epochs to train longer), except the data, selection "
                          "and architecture flags, which must match the run's (refused otherwise), and --weights and "
                          "--init_detector, which the run's weights replace")
    run.add_argument("--checkpoint", default=None,
                     help="weights to fine-tune from in a fresh run (ignored with --resume)")
    run.add_argument("--early_stop", type=non_negative_int, default=0, metavar="N",
                     help="stop after N epochs without improvement of --select_metric (0 disables)")
    run.add_argument("--patience", type=non_negative_int, default=3, metavar="N",
                     help="ReduceLROnPlateau (without --use_cosine): halve the lr when a validation is the (N+1)th in "
                          "a row without improvement of --select_metric")
    dist_group = parser.add_argument_group("distributed (launch with torchrun)")
    dist_group.add_argument("--sync_bn", action="store_true",
                            help="SyncBatchNorm across GPUs for layers that train BatchNorm")
    dist_group.add_argument("--find_unused_parameters", action="store_true",
                            help="DDP option; only needed if some parameters get no gradient")
    add_model_args(parser, backbone=backbone)
    add_limit_args(parser.add_argument_group("detections"), from_checkpoint=False)
    add_augment_args(parser)
    return parser


def main(argv: Sequence[str] | None, backbone: str, description: str) -> dict[str, Any]:
    """Entry point of the train scripts; returns the final history row and output paths."""
    parser = build_parser(backbone, description)
    args = parser.parse_args(argv)
    if args.val_dir and args.split_groups:
        parser.error("--val_dir names the held-out samples, --split_groups chooses them from --train_dir; pass one")
    typed = typed_flags(parser, sys.argv[1:] if argv is None else argv, args)
    if args.demo:
        from synthetic import apply_demo_settings

        apply_demo_settings(args, typed)
    if args.resume and "output_dir" not in typed:  # the resumed run's folder, not another run's
        args.output_dir = str(Path(args.resume).parent)
    if args.tile is None:
        args.tile = args.crop
    if args.test_dir and _first_process():  # its id map is checked now, not after training
        UnlabelledImages(Path(args.test_dir), find_id_map(Path(args.test_dir), args.id_map_json))
    summary = train(args, backbone, typed)
    if summary.get("interrupted"):
        raise SystemExit(EXIT_INTERRUPTED)
    if args.test_dir and _first_process():  # one process predicts after torchrun
        id_map = args.id_map_json  # None: beside --test_dir, else the images numbered (inference.predict_folder)
        best, output = Path(args.output_dir) / "best.pth", Path(args.output_dir) / "test-results.json"
        try:
            summary["submission"] = str(predict_folder(best, args.test_dir, id_map, output, validation_settings(args),
                                                       device=args.device))
        except (KeyboardInterrupt, *EXPECTED_ERRORS) as err:  # the train command again would train anew:
            command = ["python", "inference.py", "--checkpoint", str(best), "--test_dir", str(args.test_dir),
                       *(["--id_map_json", str(id_map)] if id_map else []), "--output", str(output), "--window", "0",
                       "--tile_overlap", str(args.tile_overlap)]  # the tile: the run's own (predictor.training_tile)
            advice = f"Training is finished and saved: predict with {shlex.join(command)}"
            if isinstance(err, KeyboardInterrupt):  # send the user to inference.py, whatever stopped the prediction
                print(f"{args.test_dir}: prediction stopped. {advice} (the train command would train again).",
                      file=sys.stderr)
                raise
            raise type(err)(f"{str(err).rstrip('.')}. {advice} once that is fixed (the train command would train "
                            "again).") from err
    print("outputs:")
    for key, value in summary.items():
        if key.endswith(("pth", "json", "dir", "submission")):
            print(f"  {key:>14}: {value}")
    return summary


def train(args: argparse.Namespace, backbone: str, typed: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """Single-process or torchrun-distributed training; only rank 0 writes files. ``typed``: the
    flags given on the command line (``typed_flags``), which a resumed run may take over its own."""
    info, device = init_distributed(args.device)
    try:
        with StopRequest() as stop:
            return _train(args, backbone, info, device, stop, typed)
    finally:
        cleanup()


def _train(args: argparse.Namespace, backbone: str, info: DistInfo, device: torch.device,
           stop: StopRequest, typed: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    out = writable_dir(args.output_dir) if info.is_main else Path(args.output_dir)
    enable_tf32(device)
    resume = load_checkpoint(args.resume) if args.resume else None
    if resume is not None and not {"optimizer", "rng"} <= resume.keys():
        raise CheckpointError(f"{args.resume}: holds weights only, no training state to resume; pass it as "
                              f"--checkpoint {args.resume} to train from its weights in a new run.")
    later = recorded_epochs(out) if resume is not None and Path(args.resume).resolve().parent == out.resolve() else 0
    if resume is not None and later > resume["epoch"]:  # best.pth of a run that went on: its later epochs are kept
        raise CheckpointError(f"{args.resume}: epoch {resume['epoch']} of a run that {out / 'history.json'} records "
                              f"to epoch {later}; resuming it would overwrite the later epochs. "
                              f"Continue the run with --resume {out / 'last.pth'} (--epochs N to train longer), or "
                              f"branch from it in a new folder: --resume {args.resume} --output_dir NEW_DIR.")
    if resume is not None:
        resume_flags(args, saved_args(resume), typed, info)
    torch.manual_seed(args.seed)
    for note in schedule_notes(args):
        _log(info, note)
    start = load_checkpoint(args.checkpoint) if args.checkpoint and not resume else None
    config = _run_config(args, backbone, resume, info, typed)
    if start is not None:
        config = _fine_tune_config(config, start, info)
        taught = saved_args(start).get("class_names")  # the names its cells were taught
        if "class_names" not in typed and taught:
            args.class_names = taught
    if args.class_names:  # typed: a count that does not fit stops now, not in inference.py; else the run's, fitted
        args.class_names = class_names_for(args.class_names if "class_names" in typed else None, args.class_names,
                                           config["num_classes"])
    broadcast(None, info)  # every rank has read its checkpoint (maybe a file in ``out``) before files move
    if info.is_main and (resume is None or Path(args.resume).resolve().parent != out.resolve()):
        aside = set_aside(out, RUN_FILES)
        if aside is not None:
            _log(info, f"note: {out} held another run; its files are kept in {aside}")
    train_set, val_set = _datasets(args, out, info)
    model = build_model(config, load_weights=resume is None and start is None).to(device)
    if start is not None:
        load_weights(model, start["model"], Path(args.checkpoint), config, saved_config(start["config"]))
        del start  # the optimizer and EMA states it also holds are not needed
    optimizer = fused_adamw([p for p in model.parameters() if p.requires_grad], args.lr, args.weight_decay)
    if args.class_balance:
        weights = balanced_class_weights([i.labels for i in train_set.instances], config["num_classes"])
        model.roi_heads.class_weights = torch.tensor(weights, device=device)
        _log(info, f"class-balanced classification loss: weights {[round(w, 3) for w in weights]}")
    sampler = train_sampler(train_set, info, args.seed, args.repeat_thresh)
    if args.repeat_thresh > 0:
        factors = class_repeat_factors([i.labels for i in train_set.instances], args.repeat_thresh)
        _log(info, f"repeat-factor sampling: class factors {factors}, about {len(sampler)} samples per epoch "
                   "(fractional factors are rounded at random each epoch)")
    schedule = LRSchedule(optimizer, args, steps_per_epoch=math.ceil(len(sampler) / args.batch_size))
    opt = Optimisation(optimizer, schedule, torch.amp.GradScaler("cuda", enabled=args.use_amp and device.type == "cuda"),
                       ModelEMA(model, args.ema_decay, warmup_steps=schedule.warmup_steps) if args.ema_decay > 0 else None,
                       args.clip_grad)
    state = {"epoch": 0, "best_metric": float("-inf"), "best_epoch": 0, "history": [], "partial": None}
    if resume:
        model.load_state_dict(resume.get("raw_model") or resume["model"])
        opt.load_state_dict(resume)
        for group in optimizer.param_groups:  # the saved groups hold the run's decay: a typed one applies
            group["weight_decay"] = args.weight_decay
        if opt.ema is not None and not resume.get("ema"):  # --ema_decay new to the run: average its weights,
            opt.ema.module.load_state_dict(model.state_dict())  # not the random ones it was built from
        state = {k: resume.get(k) for k in state}
        set_rng_state(resume["rng"])
        _log(info, f"resumed from {args.resume} at epoch {state['epoch'] + 1}")
        if state["epoch"] >= args.epochs:  # else the loop is empty and the run looks finished at once
            _log(info, f"note: the run has done {state['epoch']} epochs, --epochs is {args.epochs}: nothing to train; "
                       f"pass --epochs {state['epoch'] + 1} or more to train longer")
    decorrelate_ranks(info)  # after the shared init (and rank 0's saved state): each rank its own augmentation
    net = _wrap_distributed(model, args, info, device)
    loaders = _loaders(args, train_set, val_set, sampler, info, device)
    coco_gt = build_coco_gt(val_set.instances, val_set.image_ids) if info.is_main and len(val_set) else None

    def snapshot(ema: bool = False) -> dict[str, Any]:
        return build_checkpoint(model, config, opt.state_dict(), state, vars(args), opt.ema.module if ema else None)

    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        partial = state["partial"] if state["partial"] and state["partial"]["epoch"] == epoch else None
        sampler.set_epoch(epoch)  # same order whether resumed or not
        sampler.skip = epoch_samples_done(partial, args.batch_size, info.world_size)
        meter = EpochMeter.resumed(partial["meter"], info) if partial else EpochMeter()
        resumed_at = (sampler.skip, meter.batches)  # this epoch's samples and steps before this process

        def keep_steps(agreed: bool = False) -> Path:
            """last.pth holding this epoch's steps so far, for --resume (``agreed``: every rank is here)."""
            samples = samples_trained(resumed_at[0], meter.batches - resumed_at[1], args.batch_size, info.world_size)
            state["partial"] = {"epoch": epoch, "batches": meter.batches, "samples": samples,
                                "meter": meter.saved(info, device, agreed)}
            if info.is_main:
                save_checkpoint(out / "last.pth", snapshot())
            return out / "last.pth"

        try:
            row = run_epoch(net, loaders, opt, device, args, epoch, coco_gt, meter, stop, info)
        except DeviceMemoryError as err:  # the fix is a flag: keep the steps it cost
            raise DeviceMemoryError(f"{str(err).rstrip('.')}; {_memory_resume(keep_steps, out, info)}") from err
        except DivergenceError as err:  # weights that diverged never replace the last good ones
            message = str(err).rstrip(".")
            if amp_dtype(device, args.use_amp) is not None:  # not where --use_amp computes in float32
                message += f", or drop --use_amp ({precision(device, True)} here)"
            if (out / "last.pth").exists():
                message += f"; then --resume {out / 'last.pth'} continues from its last finished epoch"
            raise DivergenceError(f"{message}.") from err
        if row is None:  # stopped by a signal: keep the steps done so far
            kept = keep_steps(True)  # every rank: the stop is agreed, and the sums are totalled across ranks
            _log(info, f"stopped at epoch {epoch}, step {meter.batches}; continue with --resume {kept}")
            return _interrupted(out)
        state["partial"] = None
        state["history"].append(row)
        state["epoch"] = epoch
        if "val" in loaders and "val_loss" not in row:  # a skipped validation selects nothing
            _save_last(out, snapshot(), state["history"], info)
            _log(info, _epoch_line(row, args.select_metric, False))
            continue
        raw_metric = row.get(args.select_metric, -row.get("val_loss", row["train_loss"]))
        ema_metric = row.get(f"ema_{args.select_metric}")
        use_ema = ema_metric is not None and ema_metric > raw_metric
        metric = ema_metric if use_ema else raw_metric
        improved = metric > state["best_metric"]
        if improved:
            state["best_metric"], state["best_epoch"] = metric, epoch
        row.update(best_epoch=state["best_epoch"], select_metric=args.select_metric)  # what plot_curve.py marks
        schedule.epoch_end(raw_metric)  # the plateau schedule follows the weights being trained
        ckpt = snapshot()
        if info.is_main and improved:  # best.pth holds whichever weights scored higher; inference reads "model"
            save_checkpoint(out / "best.pth", snapshot(ema=True) if use_ema else ckpt)
        # raw weights best: last.pth is the same dict, linked instead of written twice
        _save_last(out, ckpt, state["history"], info, same_as=out / "best.pth" if improved and not use_ema else None)
        _log(info, _epoch_line(row, args.select_metric, improved))
        if args.early_stop > 0 and epoch - state["best_epoch"] >= args.early_stop:
            _log(info, f"early stop: no improvement of {args.select_metric} for {args.early_stop} epochs")
            break
    if any_rank(stop.requested, info, device):  # in the last validation: saved, no test folder predicted; all ranks agree
        _log(info, f"stopped after epoch {state['epoch']}, saved in {out / 'last.pth'}")
        return _interrupted(out)
    return {"best_epoch": state["best_epoch"], f"best_{args.select_metric}": state["best_metric"],
            "best.pth": out / "best.pth", "last.pth": out / "last.pth", "history.json": out / "history.json",
            "split.json": out / "split.json", "output_dir": out}


def _first_process() -> bool:
    """Whether this is rank 0 of a torchrun launch, or the only process: what runs once, before
    the process group exists or after it is gone (the id map's check, the test folder's
    prediction, notes on the data)."""
    return int(os.environ.get("RANK", "0")) == 0


def _interrupted(out: Path) -> dict[str, Any]:
    """The summary of a run stopped by a signal: ``train.py`` exits 3 on it and names last.pth."""
    return {"interrupted": True, "last.pth": out / "last.pth", "output_dir": out}


def _memory_resume(keep_steps: Callable[[], Path], out: Path, info: DistInfo) -> str:
    """How to continue after running out of memory. Rank 0 saves the epoch's steps; another
    rank cannot (only rank 0 writes, and it is waiting for this one), so it names what is saved."""
    if info.is_main:
        return f"the steps so far are kept: rerun with that fix and --resume {keep_steps()}."
    if (out / "last.pth").exists():
        return (f"on rank {info.rank} (only rank 0 saves: this epoch's steps are lost): rerun with that fix and "
                f"--resume {out / 'last.pth'}, its last finished epoch.")
    return f"on rank {info.rank}, before any epoch was saved: rerun with that fix."


def _save_last(out: Path, ckpt: dict[str, Any], history: list[dict], info: DistInfo,
               same_as: Path | None = None) -> None:
    """last.pth and history.json after every epoch, on rank 0; ``same_as``: a file just
    written from ``ckpt`` that last.pth may share."""
    if info.is_main:
        if same_as is None:
            save_checkpoint(out / "last.pth", ckpt)
        else:
            link_checkpoint(same_as, out / "last.pth")
        write_history(out / "history.json", history)


# The train script of each backbone, which a resumed run of the other one is sent to.
TRAIN_SCRIPTS = {"resnet101": "train_resnet.py", "effnet_v2_m": "train_effnet_v2.py"}
# What a run writes into --output_dir: a fresh run sets an earlier run's aside, never over it.
RUN_FILES = ("best.pth", "last.pth", "history.json", "split.json", "test-results.json",
             f"test-results.json{JOURNAL_SUFFIX}", ID_MAP_FILE, *CURVE_FILES.values())
# Flags a resumed run keeps: they decide the split, the sampler's order and steps per epoch, or
# what "best" means, so a change would mix two runs into one history.
RUN_FLAGS = ("train_dir", "val_dir", "val_split", "split_seed", "split_groups", "seed", "select_metric",
             "eval_max_dets", "repeat_thresh")
# Where the samples are read from: where the recorded path is gone, another path holding the same
# samples, split alike, is the same data (a dataset moved or mounted elsewhere).
DATA_PATHS = ("train_dir", "val_dir", "split_groups")
# Flags of this invocation and machine, not of the run: a resumed run takes them from today's
# command (so --use_amp, an out-of-memory fix, can also be dropped on resume).
INVOCATION_FLAGS = ("resume", "output_dir", "checkpoint", "device", "use_amp", "num_workers", "decode_workers",
                    "no_cache_images")
# Model settings a resumed run may change, as the out-of-memory advice asks (and --resume's help
# promises for any typed flag): no weight depends on them.
RESUME_LIMITS = ("max_size", "min_size", "max_upscale", "input_scale", "rpn_pre_nms_top_n_train",
                 "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test",
                 "rpn_batch_size_per_image", "box_batch_size_per_image", "detections_per_img", "detections_per_class",
                 "box_score_thresh", "box_nms_thresh")


def schedule_notes(args: argparse.Namespace) -> list[str]:
    """Flag combinations that run but defeat one another, said at the start rather than found in
    the curves after a day of training."""
    notes = []
    if args.warmup_epochs >= args.epochs:
        notes.append(f"note: --warmup_epochs {args.warmup_epochs:g} >= --epochs {args.epochs}: the learning rate "
                     "rises for the whole run and never reaches --lr; pass fewer --warmup_epochs")
    validations_to_lower = (args.patience + 1) * args.eval_every
    if not args.use_cosine and 0 < args.early_stop <= validations_to_lower:
        notes.append(f"note: --early_stop {args.early_stop} stops the run before the plateau schedule can lower the "
                     f"learning rate ({args.patience + 1} validations without improvement, --patience "
                     f"{args.patience}, every {args.eval_every} epoch(s)); pass a larger --early_stop or --use_cosine")
    if args.copy_paste_rare and not args.copy_paste:
        notes.append("note: --copy_paste_rare picks which cells --copy_paste pastes, and --copy_paste is 0: nothing "
                     "is pasted; pass --copy_paste P (e.g. 0.5)")
    return notes


def resume_flags(args: argparse.Namespace, original: dict[str, Any], typed: set[str] | frozenset[str],
                 info: DistInfo = DistInfo()) -> None:
    """``--resume`` continues the run it names: every flag not typed now takes that run's value
    (its schedule, learning rate, EMA, augmentation, epochs), so the command the interruption
    message prints goes on as if never stopped; a typed flag overrides (``--epochs 60`` to train
    longer), within what ``_run_config`` allows."""
    taken = {k: v for k, v in original.items()
             if k in vars(args) and k not in typed and k not in INVOCATION_FLAGS and getattr(args, k) != v}
    for key, value in taken.items():
        setattr(args, key, value)
    if taken:
        shown = (f"--{k}" if v is True else f"no --{k}" if v is False else f"--{k} {v}"
                 for k, v in sorted(taken.items()))
        _log(info, "resumed with the run's own " + ", ".join(shown))


def _run_config(args: argparse.Namespace, backbone: str, resume: dict | None, info: DistInfo = DistInfo(),
                typed: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """The model config: from the flags, or for ``--resume`` the checkpoint's, refusing flags that
    would change its architecture or its data and taking the limits of ``RESUME_LIMITS`` typed now."""
    config = config_from_args(args, backbone)
    if resume is None:
        return config
    saved = resume["config"]
    trained = saved_config(saved)  # a head missing from an older run's config: trained without it
    differing = [k for k in ARCH_KEYS if (k in saved or k in HEADS) and trained[k] != config[k]]
    if trained.get("backbone", backbone) != backbone:  # no flag chooses the backbone: the script does
        raise CheckpointError(f"{args.resume}: trained with the {trained['backbone']} backbone; continue it with "
                              f"{TRAIN_SCRIPTS[trained['backbone']]} --resume {args.resume}.")
    if differing:
        raise CheckpointError(f"{args.resume}: --resume into a run with other settings "
                              f"(trained with {arch_flags(trained, differing)}, now {arch_flags(config, differing)}); "
                              "drop the typed flags to continue the run as it was, or start a new --output_dir.")
    original = resume.get("args") or {}
    then = {**original, "split_seed": _split_seed(original)}
    now = {**vars(args), "split_seed": _split_seed(vars(args))}
    changed = [k for k in RUN_FLAGS if k in original and not same_flag(then[k], now[k])]
    moved = set(changed) <= set(DATA_PATHS) and not any(then[k] and Path(then[k]).exists() for k in changed)
    if changed and moved and _same_split(args, Path(args.resume).parent / "split.json"):
        _log(info, "note: resumed with the run's samples read from " + ", ".join(f"--{k} {now[k]}" for k in changed))
        changed = []  # the data moved: the same samples, split alike
    if changed:
        was = " ".join(f"--{k} {then[k]}" for k in changed)
        given = " ".join(f"--{k} {now[k]}" for k in changed)
        raise CheckpointError(f"{args.resume}: --resume with other data or selection flags (trained with {was}, "
                              f"now {given}); drop the typed flags to continue the run as it was, or start a new "
                              "--output_dir.")
    limits = {k: config[k] for k in RESUME_LIMITS if k in typed and config[k] != trained.get(k)}
    if limits:
        _log(info, "note: resumed with " + ", ".join(f"--{k} {v} (was {trained.get(k)})" for k, v in limits.items()))
    return {**config, **trained, **limits}


def _same_split(args: argparse.Namespace, split_json: Path) -> bool:
    """Whether the flags split the samples as the run's ``split.json`` records (False without one)."""
    try:
        saved = json.loads(split_json.read_text())
    except (OSError, ValueError):
        return False
    _, train_names, val_names, _ = split_of(args)
    return isinstance(saved, dict) and (saved.get("train"), saved.get("val")) == (train_names, val_names)


def split_of(args: argparse.Namespace) -> tuple[list[Path], list[str], list[str], list[Path]]:
    """The samples of ``--train_dir``, the names trained on and held out, and the held-out samples
    (of ``--val_dir``, or chosen from ``--train_dir`` by ``--split_groups`` / ``--val_split``)."""
    samples = list_samples(Path(args.train_dir))
    names = [p.name for p in samples]
    if args.val_dir:  # an explicit held-out folder
        if Path(args.val_dir).resolve() == Path(args.train_dir).resolve():
            raise DatasetError(f"{args.val_dir}: --val_dir is --train_dir, so every held-out sample also trains and "
                               "the scores would select on training data; pass a separate folder, or drop --val_dir "
                               "to hold out --val_split of --train_dir.")
        val_samples = list_samples(Path(args.val_dir), "--val_dir")
        both = sorted(set(names) & {p.name for p in val_samples})
        if both and _first_process():
            print(f"note: {len(both)} of --val_dir's {len(val_samples)} samples have names also in --train_dir "
                  f"({few(both)}): if they are the same images, the held-out scores are training scores")
        return samples, names, [p.name for p in val_samples], val_samples
    groups = sample_groups(args.split_groups, names) if args.split_groups else None
    train_names, val_names = split_samples(names, args.val_split, _split_seed(vars(args)), groups)
    by_name = dict(zip(names, samples))
    return samples, train_names, val_names, [by_name[n] for n in val_names]


def _split_seed(flags: dict[str, Any]) -> Any:
    """The seed the split was drawn with: ``--split_seed``, else ``--seed``."""
    return flags.get("seed") if flags.get("split_seed") is None else flags["split_seed"]


def same_flag(before: Any, now: Any) -> bool:
    """A flag's value then and now; two spellings of one folder are the same."""
    if before == now:
        return True
    if isinstance(before, str) and isinstance(now, str):
        return Path(before).resolve() == Path(now).resolve()
    return False


def typed_flags(parser: argparse.ArgumentParser, argv: Sequence[str], args: argparse.Namespace) -> set[str]:
    """The destinations of the flags ``argv`` gives, as argparse resolves them (abbreviations,
    ``--flag=value``): parsed once more into a namespace whose every field holds a marker,
    since argparse fills in a default only where the namespace has no value."""
    marker = object()
    probe = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(vars(args), marker)))
    return {key for key, value in vars(probe).items() if value is not marker}


def _fine_tune_config(config: dict[str, Any], start: dict, info: DistInfo) -> dict[str, Any]:
    """Fine-tuning takes the checkpoint's backbone layout: random-init runs (``--weights none``)
    train GroupNorm, pretrained ones frozen BatchNorm and frozen early blocks, so the weights
    only fit the layout they were trained in, whatever ``--weights`` says (it loads nothing here)."""
    trained = start.get("config", {}).get("weights", config["weights"])
    if (trained == "none") == (config["weights"] == "none"):
        return config
    _log(info, f"note: --checkpoint was trained with --weights {trained}; fine-tuning keeps its backbone layout")
    return {**config, "weights": trained}


def _datasets(args: argparse.Namespace, out: Path, info: DistInfo) -> tuple[LabelledImages, LabelledImages]:
    samples, train_names, val_names, val_samples = split_of(args)
    ids = {p.name: i + 1 for i, p in enumerate(samples)}
    by_name = {p.name: p for p in samples}
    # an explicit held-out folder is numbered 1..N, as evaluate.py numbers it
    val_ids = list(range(1, len(val_samples) + 1)) if args.val_dir else [ids[n] for n in val_names]
    if info.is_main:
        write_split(out / "split.json", train_names, val_names, _split_seed(vars(args)), args.val_split,
                    split_groups=args.split_groups, val_dir=args.val_dir and str(Path(args.val_dir).resolve()))
    train_set = LabelledImages([by_name[n] for n in train_names], [ids[n] for n in train_names],
                               desc="decode train labels", crop_window=build_crop_window(args),
                               cache_images=not args.no_cache_images)
    val_set = LabelledImages(val_samples, val_ids, desc="decode val labels",
                              cache_images=not args.no_cache_images)
    for folder, ds in ((args.val_dir, val_set), (args.train_dir, train_set)):
        present = max((int(i.labels.max()) for i in ds.instances if len(i)), default=0)
        if present >= args.num_classes:  # else an index error in the sampler, a device assert in the loss on CUDA
            raise UsageError(f"{folder or args.train_dir}: cells of class {present} but --num_classes "
                             f"{args.num_classes} (background included); pass --num_classes {present + 1} or more.")
    weights = (balanced_class_weights([i.labels for i in train_set.instances], args.num_classes)
               if args.copy_paste_rare else [1.0] * args.num_classes)
    train_set.transforms = build_train_transforms(args, Donors(train_set.donor, weights))
    for name, ds in (("train", train_set), ("val", val_set)):
        if ds.empty:
            _log(info, f"note: {len(ds.empty)} {name} sample(s) have no instances (kept as background): {ds.empty[:5]}")
    if sum(len(i) for i in train_set.instances) == 0:
        raise DatasetError(f"{args.train_dir}: no instances in any training sample; check the class*.tif files.")
    if len(val_set) and not sum(len(i) for i in val_set.instances):  # AP would be -1 or 0: best.pth a coin toss
        fix = ("--val_dir a folder with cells" if args.val_dir else
               "another --split_seed or a larger --val_split (split.json lists them), or --val_split 0 to select on "
               "the training loss")
        raise DatasetError(f"{args.val_dir or args.train_dir}: the {len(val_set)} held-out sample(s) hold no cell, so "
                           f"no epoch can be scored; start a new run with {fix}.")
    if not len(val_set):
        _log(info, "note: no validation samples: best.pth, --early_stop and the plateau schedule follow the "
                   "training loss")
    _log(info, f"data: {len(train_set)} train / {len(val_set)} val samples, "
               f"{sum(len(i) for i in train_set.instances)} train instances")
    return train_set, val_set


def _loaders(args: argparse.Namespace, train_set: LabelledImages, val_set: LabelledImages,
             sampler: Sampler[int], info: DistInfo, device: torch.device) -> dict[str, DataLoader]:
    common = {"collate_fn": collate_fn, "num_workers": args.num_workers, "pin_memory": device.type == "cuda",
              "persistent_workers": args.num_workers > 0, "worker_init_fn": ignore_stop_signals}
    loaders = {"train": DataLoader(train_set, batch_size=args.batch_size, sampler=SeededDraws(sampler, args.seed),
                                   **common)}
    if len(val_set):
        shard = Subset(val_set, range(info.rank, len(val_set), info.world_size))  # no duplicates in the metric
        loaders["val"] = DataLoader(shard, batch_size=args.batch_size, shuffle=False, **common)
    return loaders


def _wrap_distributed(model: nn.Module, args: argparse.Namespace, info: DistInfo, device: torch.device) -> nn.Module:
    if not info.enabled:
        return model
    if args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Buffers are broadcast from rank 0 at every forward only where they change: the statistics of
    # BatchNorm layers that train without --sync_bn (SyncBatchNorm keeps them equal by itself).
    # Frozen BatchNorm's and everything else's never change.
    drifting = not args.sync_bn and any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                                        for m in model.modules())
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               find_unused_parameters=args.find_unused_parameters,
                                               broadcast_buffers=drifting)


def _log(info: DistInfo, message: str) -> None:
    if info.is_main:
        print(message, flush=True)


def _epoch_line(row: dict[str, Any], select: str, improved: bool) -> str:
    parts = [f"epoch {row['epoch']}", f"loss {row['train_loss']:.4f}"]
    if "val_loss" in row:
        parts.append(f"val_loss {row['val_loss']:.4f}")
    for key in ("segm_AP", "segm_AP50", "bbox_AP50", "ema_segm_AP50"):
        if key in row:
            parts.append(f"{key} {row[key]:.4f}")
    parts.append(f"{row['seconds']:.0f}s ({row['step_seconds']:.2f}s/step)")
    return " | ".join(parts) + (f"  * best {select}" if improved else "")
