"""The training loop shared by both train scripts.

One epoch = train (AMP, clipping, per-step warm-up/cosine), validation loss (train-mode
forward with BatchNorm and dropout frozen), COCO AP in eval mode, then ``last.pth``,
``best.pth`` on improvement and one ``history.json`` row.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, Subset
from tqdm import tqdm

from augment import add_augment_args, build_crop_window, build_train_transforms
from checkpoint import (link_checkpoint, load_checkpoint, load_weights, rng_state,
                        save_checkpoint, set_rng_state)
from coco import build_coco_gt, evaluate, matching_metrics
from dataloader import (HW3TrainDataset, collate_fn, list_samples, sample_groups, split_samples,
                        write_split)
from distributed import (DistInfo, StopRequest, any_rank, broadcast, cleanup, decorrelate_ranks, gather_lists,
                         init_distributed, sum_across)
from detector import check_boxes
from ema import ModelEMA
from errors import CheckpointError, DatasetError
from files import writable_dir
from history import LOSS_KEYS, write_history
from inference import autocast as _autocast
from inference import predict, predict_folder
from masks import PackedMasks
from model import ARCH_KEYS, add_model_args, build_model, config_from_args, saved_config
from sampling import class_repeat_factors, train_sampler

SELECT_METRICS = tuple(f"{t}_{m}" for t in ("segm", "bbox") for m in ("AP50", "AP", "AP75"))
MAX_BAD_STEPS = 20  # consecutive non-finite losses before the run stops
READ_EVERY = 10  # steps between reads of the losses (a host sync) and, under torchrun, stop-flag checks
EXIT_INTERRUPTED = 3  # exit status of a run stopped by SIGTERM/Ctrl-C after saving last.pth


def build_parser(backbone: str, description: str) -> argparse.ArgumentParser:
    """All training flags; the backbone-specific defaults come from the calling script."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data and outputs")
    data.add_argument("--train_dir", default="dataset/train", help="folder of <sample>/image.tif + classN.tif")
    data.add_argument("--test_dir", default=None, help="test folder, predicted after training when given")
    data.add_argument("--id_map_json", default=None,
                      help="test_image_name_to_ids.json (default: next to --test_dir)")
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
    data.add_argument("--num_workers", type=int, default=2, help="DataLoader worker processes")
    data.add_argument("--no_cache_images", action="store_true",
                      help="decode each image on every access instead of keeping the decoded images in memory "
                           "(in their stored dtype: 3 bytes a pixel for 8-bit RGB, ~0.6 GB for HW3's training set)")
    data.add_argument("--repeat_thresh", type=float, default=0.0,
                      help="repeat-factor sampling: images with classes in fewer than this share of images "
                           "repeat up to sqrt(t/f) times per epoch (0 disables)")
    data.add_argument("--demo", action="store_true",
                      help="write a small synthetic dataset into --output_dir and run train + predict on it")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=40)
    optim.add_argument("--batch_size", type=int, default=2)
    optim.add_argument("--lr", type=float, default=2e-4, help="AdamW peak learning rate")
    optim.add_argument("--weight_decay", type=float, default=1e-4)
    optim.add_argument("--warmup_epochs", type=float, default=5, help="linear warm-up from 0, per step")
    optim.add_argument("--use_cosine", action="store_true",
                       help="cosine decay to --eta_min after warm-up (default: ReduceLROnPlateau on --select_metric)")
    optim.add_argument("--eta_min", type=float, default=5e-6)
    optim.add_argument("--clip_grad", type=float, default=10.0, help="max gradient norm (0 disables)")
    optim.add_argument("--ema_decay", type=float, default=0.0,
                       help="keep an exponential moving average of the weights, scored beside them (0 disables)")
    optim.add_argument("--use_amp", action="store_true", help="mixed precision: fp16 + GradScaler on CUDA, bf16 on CPU")
    optim.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: CUDA when present)")
    run = parser.add_argument_group("checkpoints and selection")
    run.add_argument("--select_metric", choices=SELECT_METRICS, default="segm_AP50",
                     help="validation metric that picks best.pth (the competition scores segm AP50)")
    run.add_argument("--eval_every", type=int, default=1,
                     help="validate every N epochs and after the last (best.pth is chosen among validated epochs)")
    run.add_argument("--eval_max_dets", type=int, default=100,
                     help="COCOeval maxDets (pycocotools' default 100 is what leaderboards use)")
    run.add_argument("--tile", type=int, default=None,
                     help="validate images larger than this tile by tile, each tile scaled like a training crop "
                          "(0: whole images; default: --crop, the context the model trains on, which scores "
                          "higher, see README)")
    run.add_argument("--tile_overlap", type=float, default=0.25, help="overlap of neighbouring tiles, share of --tile")
    run.add_argument("--resume", default=None, help="last.pth to continue a run (optimizer, schedule, history...)")
    run.add_argument("--checkpoint", default=None, help="weights to fine-tune from (a fresh run otherwise)")
    run.add_argument("--early_stop", type=int, default=0, metavar="N",
                     help="stop after N epochs without improvement of --select_metric (0 disables)")
    run.add_argument("--patience", type=int, default=3, metavar="N",
                     help="ReduceLROnPlateau: halve the lr after N epochs without improvement (without --use_cosine)")
    dist_group = parser.add_argument_group("distributed (launch with torchrun)")
    dist_group.add_argument("--sync_bn", action="store_true",
                            help="SyncBatchNorm across GPUs for layers that train BatchNorm")
    dist_group.add_argument("--find_unused_parameters", action="store_true",
                            help="DDP option; only needed if some parameters get no gradient")
    add_model_args(parser, backbone=backbone)
    add_augment_args(parser)
    return parser


def share(text: str) -> float:
    """argparse type for --val_split: a share in [0, 1), so at least one sample trains."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def main(argv: Sequence[str] | None, backbone: str, description: str) -> dict[str, Any]:
    """Entry point of the train scripts; returns the final history row and output paths."""
    parser = build_parser(backbone, description)
    args = parser.parse_args(argv)
    if args.val_dir and args.split_groups:
        parser.error("--val_dir names the held-out samples, --split_groups chooses them from --train_dir; pass one")
    if args.demo:
        from synthetic import apply_demo_settings

        apply_demo_settings(args, sys.argv[1:] if argv is None else argv)
    if args.tile is None:
        args.tile = args.crop
    summary = train(args, backbone)
    if summary.get("interrupted"):
        raise SystemExit(EXIT_INTERRUPTED)
    if args.test_dir and int(os.environ.get("RANK", "0")) == 0:  # one process predicts after torchrun
        id_map = args.id_map_json or Path(args.test_dir).parent / "test_image_name_to_ids.json"
        summary["submission"] = str(predict_folder(
            Path(args.output_dir) / "best.pth", args.test_dir, id_map,
            Path(args.output_dir) / "test-results.json", batch_size=args.batch_size, device=args.device,
            use_amp=args.use_amp, tile=args.tile, tile_overlap=args.tile_overlap))
    print("outputs:")
    for key, value in summary.items():
        if key.endswith(("pth", "json", "dir", "submission")):
            print(f"  {key:>14}: {value}")
    return summary


def train(args: argparse.Namespace, backbone: str) -> dict[str, Any]:
    """Single-process or torchrun-distributed training; only rank 0 writes files."""
    info, device = init_distributed(args.device)
    try:
        with StopRequest() as stop:
            return _train(args, backbone, info, device, stop)
    finally:
        cleanup()


def _train(args: argparse.Namespace, backbone: str, info: DistInfo, device: torch.device,
           stop: StopRequest) -> dict[str, Any]:
    out = writable_dir(args.output_dir) if info.is_main else Path(args.output_dir)
    enable_tf32(device)
    torch.manual_seed(args.seed)
    resume = load_checkpoint(args.resume) if args.resume else None
    config = _run_config(args, backbone, resume)
    train_set, val_set = _datasets(args, out, info)
    model = build_model(config, load_weights=resume is None and args.checkpoint is None).to(device)
    if args.checkpoint and not resume:
        load_weights(model, load_checkpoint(args.checkpoint)["model"], Path(args.checkpoint), config)
    optimizer = fused_adamw([p for p in model.parameters() if p.requires_grad], args.lr, args.weight_decay)
    sampler = train_sampler(train_set, info, args.seed, args.repeat_thresh)
    if args.repeat_thresh > 0:
        factors = class_repeat_factors([i.labels for i in train_set.instances], args.repeat_thresh)
        _log(info, f"repeat-factor sampling: class factors {factors}, {len(sampler)} samples per epoch")
    schedule = LRSchedule(optimizer, args, steps_per_epoch=math.ceil(len(sampler) / args.batch_size))
    opt = Optimisation(optimizer, schedule, torch.amp.GradScaler("cuda", enabled=args.use_amp and device.type == "cuda"),
                       ModelEMA(model, args.ema_decay, warmup_steps=schedule.warmup_steps) if args.ema_decay > 0 else None,
                       args.clip_grad)
    state = {"epoch": 0, "best_metric": float("-inf"), "best_epoch": 0, "history": [], "partial": None}
    if resume:
        model.load_state_dict(resume.get("raw_model") or resume["model"])
        opt.load_state_dict(resume)
        state = {k: resume.get(k) for k in state}
        set_rng_state(resume["rng"])
        _log(info, f"resumed from {args.resume} at epoch {state['epoch'] + 1}")
    decorrelate_ranks(info)  # after the shared init (and rank 0's saved state): each rank its own augmentation
    net = _wrap_distributed(model, args, info, device)
    loaders = _loaders(args, train_set, val_set, sampler, info, device)
    coco_gt = build_coco_gt(val_set.instances, val_set.image_ids) if info.is_main and len(val_set) else None

    def snapshot() -> dict[str, Any]:
        return {"model": model.state_dict(), "weights": "raw", "config": config, **opt.state_dict(),
                "rng": rng_state(), "args": vars(args), **state}

    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        partial = state["partial"] if state["partial"] and state["partial"]["epoch"] == epoch else None
        sampler.set_epoch(epoch)  # same order whether resumed or not
        sampler.skip = partial["batches"] * args.batch_size if partial else 0
        meter = EpochMeter(**partial["meter"]) if partial else EpochMeter()
        row = run_epoch(net, loaders, opt, device, args, epoch, coco_gt, meter, stop, info)
        if row is None:  # stopped by a signal: keep the steps done so far
            state["partial"] = {"epoch": epoch, "batches": meter.batches, "meter": asdict(meter)}
            if info.is_main:
                save_checkpoint(out / "last.pth", snapshot())
            _log(info, f"stopped at epoch {epoch}, step {meter.batches}; continue with --resume {out / 'last.pth'}")
            return {"interrupted": True, "last.pth": out / "last.pth", "output_dir": out}
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
        schedule.epoch_end(raw_metric)  # the plateau schedule follows the weights being trained
        ckpt = snapshot()
        if info.is_main and improved:  # best.pth holds whichever weights scored higher; inference reads "model"
            save_checkpoint(out / "best.pth", {**ckpt, "model": opt.ema.module.state_dict(), "raw_model": ckpt["model"],
                                               "weights": "ema"} if use_ema else ckpt)
        # raw weights best: last.pth is the same dict, linked instead of written twice
        _save_last(out, ckpt, state["history"], info, same_as=out / "best.pth" if improved and not use_ema else None)
        _log(info, _epoch_line(row, args.select_metric, improved))
        if args.early_stop > 0 and epoch - state["best_epoch"] >= args.early_stop:
            _log(info, f"early stop: no improvement of {args.select_metric} for {args.early_stop} epochs")
            break
    return {"best_epoch": state["best_epoch"], f"best_{args.select_metric}": state["best_metric"],
            "best.pth": out / "best.pth", "last.pth": out / "last.pth", "history.json": out / "history.json",
            "split.json": out / "split.json", "output_dir": out}


def run_epoch(model: nn.Module, loaders: dict[str, DataLoader], opt: "Optimisation", device: torch.device,
              args: argparse.Namespace, epoch: int, coco_gt: Any, meter: "EpochMeter", stop: StopRequest,
              info: DistInfo) -> dict[str, Any] | None:
    """One epoch's history row, or None when a stop was requested (``meter`` then holds the
    steps done)."""
    start = time.time()
    train_one_epoch(model, loaders["train"], opt, device, args, epoch, meter, stop, info)
    if any_rank(stop.requested, info, device):
        return None
    row: dict[str, Any] = {"epoch": epoch, "lr": opt.optimizer.param_groups[0]["lr"]}
    row.update(meter.summary(info, device))
    if opt.scaler.is_enabled():  # host sync, once an epoch: a falling scale means fp16 overflows
        row["loss_scale"] = opt.scaler.get_scale()
    if "val" in loaders and (epoch % max(args.eval_every, 1) == 0 or epoch == args.epochs):
        row.update(validation_loss(model, loaders["val"], device, args.use_amp, info))
        row.update(validation_metrics(model, loaders["val"], coco_gt, device, args, info))
        if opt.ema is not None:  # the average is scored beside the raw weights
            ema_metrics = validation_metrics(opt.ema.module, loaders["val"], coco_gt, device, args, info)
            row.update({f"ema_{k}": v for k, v in ema_metrics.items()})
    row["seconds"] = round(time.time() - start, 2)
    return row


def validation_metrics(model: nn.Module, loader: DataLoader, coco_gt: Any, device: torch.device,
                       args: argparse.Namespace, info: DistInfo) -> dict[str, float]:
    """COCO metrics of the validation split, predicted in shards and scored on rank 0."""
    results = gather_lists(predict(model, loader, device, args.use_amp, desc="val predict", tile=args.tile,
                                   tile_overlap=args.tile_overlap, batch_size=args.batch_size), info)
    metrics = {**evaluate(coco_gt, results, max_dets=args.eval_max_dets),
               **matching_metrics(coco_gt, results)} if info.is_main else None
    return broadcast(metrics, info)


@dataclass
class EpochMeter:
    """Running sums of one epoch; saved in an interrupted checkpoint so a resumed epoch
    reports the same averages as an uninterrupted one.

    ``add`` keeps each step's losses on the device; ``read`` fetches the pending ones in one
    host sync (every READ_EVERY steps and at the epoch's end) and only then counts, sums and
    reports non-finite steps, in step order, so the sums are those of a per-step ``.item()``.
    ``skipped`` counts the updates not made: non-finite losses, and steps whose gradients
    overflowed under AMP (their losses are finite and summed)."""

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOSS_KEYS + ("loss",), 0.0))
    batches: int = 0
    steps: int = 0
    skipped: int = 0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.bad_in_row = 0
        self._pending: list[tuple[torch.Tensor, list]] = []

    def add(self, losses: dict[str, torch.Tensor], loss: torch.Tensor, image_ids: list,
            skipped: torch.Tensor | None = None) -> None:
        """One step's losses and whether its update was skipped (``Optimisation.step``), kept on
        the device until the next ``read``."""
        self.batches += 1
        flag = (~torch.isfinite(loss) if skipped is None else skipped).detach().to(loss.dtype)
        self._pending.append((torch.stack([losses[k].detach() for k in LOSS_KEYS] + [loss.detach(), flag]), image_ids))

    def read(self, epoch: int) -> float | None:
        """Fold the pending steps into the sums; the last finite total loss, for the progress bar."""
        if not self._pending:
            return None
        rows = torch.stack([values for values, _ in self._pending]).tolist()  # the one host sync of the logging
        last = None
        for (*row, skipped), (_, ids) in zip(rows, self._pending):
            if math.isfinite(row[-1]):
                self.bad_in_row = 0
                self.steps += 1
                for key, value in zip(LOSS_KEYS + ("loss",), row):
                    self.sums[key] += value
                last = row[-1]
                self.skipped += int(skipped)  # a finite loss, gradients that overflowed fp16: AMP skipped the update
                continue
            self.skipped += 1
            self.bad_in_row += 1
            print(f"non-finite loss skipped (epoch {epoch}, image ids {ids}): "
                  f"{ {k: round(v, 4) for k, v in zip(LOSS_KEYS, row)} }")
            if self.bad_in_row >= MAX_BAD_STEPS:
                raise RuntimeError(f"{self.bad_in_row} non-finite losses in a row: lower --lr, drop --use_amp "
                                   "or check the images named above.")
        self._pending.clear()
        return last

    def summary(self, info: DistInfo, device: torch.device) -> dict[str, float]:
        totals = sum_across({**self.sums, "_steps": self.steps, "_skipped": self.skipped}, info, device)
        steps = max(totals.pop("_steps"), 1)
        row = {f"train_{k}": v / steps for k, v in totals.items() if k != "_skipped"}
        row["skipped_steps"] = int(totals["_skipped"])
        row["step_seconds"] = round(self.seconds / max(self.batches, 1), 3)
        return row


def train_one_epoch(model: nn.Module, loader: DataLoader, opt: "Optimisation", device: torch.device,
                    args: argparse.Namespace, epoch: int, meter: EpochMeter, stop: StopRequest,
                    info: DistInfo) -> None:
    """Train steps until the loader ends or a stop is requested; no host sync per step but
    the model's own (the losses are read every READ_EVERY steps, see ``EpochMeter``)."""
    model.train()
    bar = tqdm(loader, desc=f"epoch {epoch}/{args.epochs}", leave=False, disable=None if info.is_main else True)
    for images, targets in bar:
        if _stop_requested(stop, meter.batches, info, device):
            break
        start = time.time()
        opt.schedule.step()
        train_step(model, images, targets, opt, meter, device, args.use_amp, loader.dataset)
        meter.seconds += time.time() - start
        if meter.batches % READ_EVERY == 0:
            _show_loss(bar, meter.read(epoch))
    _show_loss(bar, meter.read(epoch))


def train_step(model: nn.Module, images: Sequence[torch.Tensor], targets: Sequence[dict], opt: "Optimisation",
               meter: EpochMeter, device: torch.device, use_amp: bool, dataset: Any = None) -> None:
    """One optimisation step; its losses go to ``meter`` (still on the device)."""
    images, targets = to_device(images, targets, device)
    losses = _forward_losses(model, images, targets, device, use_amp, dataset)
    loss = sum(losses.values())
    # A non-finite loss makes every gradient NaN (on every DDP rank after the all-reduce, where
    # a zeroed loss would let the other ranks step alone), so the optimizer skips the update.
    skipped = opt.step(model, loss * torch.where(torch.isfinite(loss), 1.0, math.nan))
    meter.add(losses, loss, [t["image_id"] for t in targets], skipped)


def _stop_requested(stop: StopRequest, batches: int, info: DistInfo, device: torch.device) -> bool:
    """The signal flag; under torchrun it is agreed across ranks (an all-reduce and a host sync)
    only every READ_EVERY steps, at the same steps on every rank."""
    if not info.enabled:
        return stop.requested
    return batches % READ_EVERY == 0 and any_rank(stop.requested, info, device)


def _show_loss(bar: tqdm, loss: float | None) -> None:
    if loss is not None:
        bar.set_postfix(loss=f"{loss:.3f}")


@torch.no_grad()
def validation_loss(model: nn.Module, loader: DataLoader, device: torch.device, use_amp: bool,
                    info: DistInfo = DistInfo()) -> dict[str, float]:
    """Losses on validation images: torchvision only returns losses in train mode, so
    BatchNorm and dropout are switched to eval to leave statistics untouched. The model runs
    outside DDP: its forward broadcasts buffers, a collective that a rank whose shard has no
    image would never join."""
    per_batch = []
    with losses_mode(getattr(model, "module", model)) as model:
        for images, targets in tqdm(loader, desc="val loss", leave=False, disable=None if info.is_main else True):
            images, targets = to_device(images, targets, device)
            with _autocast(device, use_amp):
                losses = model(images, targets)
            per_batch.append(torch.stack([losses[k] for k in LOSS_KEYS] + [sum(losses.values())]))
    sums = dict.fromkeys(LOSS_KEYS + ("loss",), 0.0)
    rows = torch.stack(per_batch).tolist() if per_batch else []  # one host sync, after the last batch
    for row in rows:
        for key, value in zip(sums, row):
            sums[key] += value
    batches = len(rows)
    totals = sum_across({**sums, "_batches": batches}, info, device)
    batches = max(totals.pop("_batches"), 1)
    return {f"val_{k}": v / batches for k, v in totals.items()}


@dataclass
class Optimisation:
    """What one training step changes besides the model: optimizer, schedule, AMP scaler and
    the weight average; saved and restored together."""

    optimizer: torch.optim.Optimizer
    schedule: "LRSchedule"
    scaler: torch.amp.GradScaler
    ema: ModelEMA | None
    clip_grad: float

    def step(self, model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
        """Backward (DDP ranks all join the gradient all-reduce), then an update that is skipped
        when any gradient is not finite. A fused optimizer (``fused_adamw``) and the AMP scaler
        skip it on the device, from a flag, without a host sync; the flag is returned (a device
        bool, read with the losses) and keeps the weight average still on a skipped step too.
        The learning-rate schedule counts every step, as torchvision's references do."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            norm = nn.utils.clip_grad_norm_(model.parameters(), self.clip_grad)
        else:
            norm = nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # its own inf/NaN check decides
        else:
            step_if_finite(self.optimizer, norm)
        self.scaler.update()
        skipped = ~torch.isfinite(norm)  # what the scaler's and the fused optimizer's own checks found
        if self.ema is not None:
            self.ema.update(model, applied=~skipped)
        return skipped

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict(), "ema": self.ema.state_dict() if self.ema else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # a run saved without AMP or on a CPU has none: --use_amp starts a fresh scale
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])


def enable_tf32(device: torch.device) -> None:
    """TF32 matmuls and convolutions on CUDA (Ampere and later): fp32 training at tensor-core
    speed, with a 10-bit mantissa inside the products (PyTorch leaves matmul TF32 off by
    default). Nothing changes on a CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def fused_adamw(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW as one fused kernel per device (CUDA and CPU): it can skip a step from a device
    flag (``step_if_finite``), and keeps its step counters on the device (no per-parameter
    ``.item()``)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def step_if_finite(optimizer: torch.optim.Optimizer, norm: torch.Tensor) -> None:
    """``optimizer.step()`` unless the gradient norm is not finite."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):  # fused: the kernel reads the flag
        optimizer.found_inf = (~torch.isfinite(norm)).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif torch.isfinite(norm):  # host sync: this optimizer cannot skip a step on the device
        optimizer.step()


class losses_mode:
    """Train-mode forward (so torchvision returns losses) with BatchNorm and dropout in eval."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.was_training = model.training

    def __enter__(self) -> nn.Module:
        self.model.train()
        for module in self.model.modules():
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.Dropout, nn.MultiheadAttention)):
                module.eval()
        return self.model

    def __exit__(self, *exc: Any) -> None:
        self.model.train(self.was_training)


class LRSchedule:
    """Per-step linear warm-up from 0, then cosine to ``eta_min`` or ReduceLROnPlateau."""

    def __init__(self, optimizer: torch.optim.Optimizer, args: argparse.Namespace, steps_per_epoch: int) -> None:
        self.optimizer = optimizer
        self.base_lr = args.lr
        self.eta_min = args.eta_min
        self.cosine = args.use_cosine
        self.warmup_steps = int(round(args.warmup_epochs * steps_per_epoch))
        self.total_steps = args.epochs * steps_per_epoch
        self.steps = 0
        self.patience = args.patience
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5,
                                                                  patience=args.patience)

    def step(self) -> None:
        """Set the learning rate of the step about to run."""
        self.steps += 1
        if self.steps <= self.warmup_steps or self.cosine:
            lr = warmup_cosine(self.steps, self.warmup_steps, self.total_steps, self.base_lr,
                               self.eta_min if self.cosine else self.base_lr)
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    def epoch_end(self, metric: float) -> None:
        if not self.cosine and self.steps > self.warmup_steps:
            self.plateau.step(metric)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "plateau": self.plateau.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]
        self.plateau.load_state_dict(state["plateau"])
        self.plateau.patience = self.patience  # --patience given on resume wins over the saved one


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, base_lr: float, eta_min: float) -> float:
    """lr of 1-based ``step``: linear from 0 to ``base_lr`` over warm-up, then cosine to ``eta_min``."""
    if step <= warmup_steps:
        return base_lr * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return eta_min + 0.5 * (base_lr - eta_min) * (1 + math.cos(math.pi * progress))


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


def _run_config(args: argparse.Namespace, backbone: str, resume: dict | None) -> dict[str, Any]:
    config = config_from_args(args, backbone)
    if resume is None:
        return config
    saved = resume["config"]
    differing = [k for k in ARCH_KEYS if k in saved and saved[k] != config[k]]
    if differing:
        raise CheckpointError(f"{args.resume}: --resume into a run with other settings "
                              f"({', '.join(f'{k}: {saved[k]} vs {config[k]}' for k in differing)}); "
                              "resume with the original flags or start a new --output_dir.")
    return {**config, **saved_config(saved)}


def _datasets(args: argparse.Namespace, out: Path, info: DistInfo) -> tuple[HW3TrainDataset, HW3TrainDataset]:
    samples = list_samples(Path(args.train_dir))
    ids = {p.name: i + 1 for i, p in enumerate(samples)}
    by_name = {p.name: p for p in samples}
    split_seed = args.seed if args.split_seed is None else args.split_seed
    if args.val_dir:  # an explicit held-out folder, numbered 1..N as evaluate.py numbers it
        val_samples = list_samples(Path(args.val_dir))
        train_names, val_names = list(by_name), [p.name for p in val_samples]
        val_ids = list(range(1, len(val_samples) + 1))
    else:
        groups = sample_groups(args.split_groups, list(by_name)) if args.split_groups else None
        train_names, val_names = split_samples(list(by_name), args.val_split, split_seed, groups)
        val_samples, val_ids = [by_name[n] for n in val_names], [ids[n] for n in val_names]
    if info.is_main:
        write_split(out / "split.json", train_names, val_names, split_seed, args.val_split,
                    split_groups=args.split_groups, val_dir=args.val_dir and str(Path(args.val_dir).resolve()))
    train_set = HW3TrainDataset([by_name[n] for n in train_names], [ids[n] for n in train_names],
                                build_train_transforms(args), desc="decode train labels",
                                crop_window=build_crop_window(args), cache_images=not args.no_cache_images)
    val_set = HW3TrainDataset(val_samples, val_ids, desc="decode val labels",
                              cache_images=not args.no_cache_images)
    for name, ds in (("train", train_set), ("val", val_set)):
        if ds.empty:
            _log(info, f"note: {len(ds.empty)} {name} sample(s) have no instances (kept as background): {ds.empty[:5]}")
    if sum(len(i) for i in train_set.instances) == 0:
        raise DatasetError(f"{args.train_dir}: no instances in any training sample; check the class*.tif files.")
    _log(info, f"data: {len(train_set)} train / {len(val_set)} val samples, "
               f"{sum(len(i) for i in train_set.instances)} train instances")
    return train_set, val_set


def _loaders(args: argparse.Namespace, train_set: HW3TrainDataset, val_set: HW3TrainDataset,
             sampler: Sampler[int], info: DistInfo, device: torch.device) -> dict[str, DataLoader]:
    common = {"collate_fn": collate_fn, "num_workers": args.num_workers, "pin_memory": device.type == "cuda",
              "persistent_workers": args.num_workers > 0}
    loaders = {"train": DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, **common)}
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


def _forward_losses(model: nn.Module, images: list, targets: list, device: torch.device, use_amp: bool,
                    dataset: HW3TrainDataset) -> dict[str, torch.Tensor]:
    """Training forward; out-of-memory names the images and what to change."""
    try:
        with _autocast(device, use_amp):
            return model(images, targets)
    except torch.OutOfMemoryError as err:
        names = [dataset.name_of(t["image_id"]) for t in targets]
        sizes = [f"{img.shape[-2]}x{img.shape[-1]}" for img in images]
        counts = [len(t["labels"]) for t in targets]
        raise RuntimeError(f"out of memory on {names} (sizes {sizes}, instances {counts}); try a smaller "
                           "--max_size, --batch_size 1, fewer --rpn_post_nms_top_n_train or "
                           "--box_batch_size_per_image, or --use_amp.") from err


def _log(info: DistInfo, message: str) -> None:
    if info.is_main:
        print(message, flush=True)


def to_device(images: Sequence[torch.Tensor], targets: Sequence[dict], device: torch.device) -> tuple[list, list]:
    """Images and target dicts on ``device``, packed masks included (the model reads them there);
    boxes are checked here, on the host, where torchvision's check would cost a sync per image."""
    check_boxes(targets)
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: v.to(device, non_blocking=True) if isinstance(v, (torch.Tensor, PackedMasks)) else v
                for k, v in t.items()} for t in targets]
    return images, targets


def _epoch_line(row: dict[str, Any], select: str, improved: bool) -> str:
    parts = [f"epoch {row['epoch']}", f"loss {row['train_loss']:.4f}"]
    if "val_loss" in row:
        parts.append(f"val_loss {row['val_loss']:.4f}")
    for key in ("segm_AP", "segm_AP50", "bbox_AP50", "ema_segm_AP50"):
        if key in row:
            parts.append(f"{key} {row[key]:.4f}")
    parts.append(f"{row['seconds']:.0f}s ({row['step_seconds']:.2f}s/step)")
    return " | ".join(parts) + (f"  * best {select}" if improved else "")
