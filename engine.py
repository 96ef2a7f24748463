"""The training loop: one epoch of training steps, then validation (losses, and COCO metrics
of the predictions), in reading order. Nothing here knows about files, flags or checkpoints
(``training.py`` runs the epochs around it). The host syncs of a step are marked ``host
sync``: the model's own (detector.py) and one read of the losses every READ_EVERY steps.
"""
from __future__ import annotations

import argparse
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from coco import evaluate, matching_metrics
from detector import check_boxes
from devices import autocast
from distributed import (DistInfo, StopRequest, any_rank, any_rank_each, broadcast, gather_lists, share_buffers,
                         sum_across)
from errors import DeviceMemoryError, DivergenceError
from flags import validation_settings
from history import LOGGED_LOSSES
from masks import PackedMasks
from optimisation import Optimisation
from predictor import predict
from progress import progress

MAX_BAD_STEPS = 20  # consecutive non-finite losses before the run stops
READ_EVERY = 10  # steps between reads of the losses (a host sync) and, under torchrun, stop-flag checks


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
        share_buffers(getattr(model, "module", model), info)
        if opt.ema is not None:
            share_buffers(opt.ema.module, info)
        try:
            row.update(validation_loss(model, loaders["val"], device, args.use_amp, info))
            row.update(validation_metrics(model, loaders["val"], coco_gt, device, args, info))
            if opt.ema is not None:  # the average is scored beside the raw weights
                ema_metrics = validation_metrics(opt.ema.module, loaders["val"], coco_gt, device, args, info)
                row.update({f"ema_{k}": v for k, v in ema_metrics.items()})
        except torch.OutOfMemoryError as err:  # the epoch's steps are done: training saves them, resume validates
            raise DeviceMemoryError(f"out of memory validating epoch {epoch} (the loss on whole held-out images, "
                                    f"{args.batch_size} a batch, then AP in tiles of --tile {args.tile}); pass "
                                    "--batch_size 1, a smaller --max_size or --tile, or --use_amp") from err
    row["seconds"] = round(time.time() - start, 2)
    return row


def validation_metrics(model: nn.Module, loader: DataLoader, coco_gt: Any, device: torch.device,
                       args: argparse.Namespace, info: DistInfo) -> dict[str, float]:
    """COCO metrics of the validation split, predicted in shards and scored on rank 0."""
    desc = "val predict" if info.is_main else None  # one bar, as for training
    results = gather_lists(predict(model, loader, device, validation_settings(args), desc=desc), info)
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

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOGGED_LOSSES + ("loss",), 0.0))
    batches: int = 0
    steps: int = 0
    skipped: int = 0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        for key in LOGGED_LOSSES:  # an epoch stopped before a term was logged resumes with it at 0
            self.sums.setdefault(key, 0.0)
        self.bad_in_row = 0
        self._pending: list[tuple[torch.Tensor, list]] = []

    def add(self, losses: dict[str, torch.Tensor], loss: torch.Tensor, image_ids: list,
            skipped: torch.Tensor | None = None) -> None:
        """One step's losses and whether its update was skipped (``Optimisation.step``), kept on
        the device until the next ``read``."""
        self.batches += 1
        flag = (~torch.isfinite(loss) if skipped is None else skipped).detach().to(loss.dtype)
        terms = [losses[k].detach() if k in losses else torch.zeros_like(loss) for k in LOGGED_LOSSES]
        self._pending.append((torch.stack(terms + [loss.detach(), flag]), image_ids))

    def read(self, epoch: int, info: DistInfo = DistInfo()) -> float | None:
        """Fold the pending steps into the sums; the last finite total loss, for the progress bar.
        Under torchrun every rank reads at the same steps, and a step counts as non-finite for
        the run's stop where any rank's loss was: the ranks stop together, none waits alone in
        the next all-reduce."""
        if not self._pending:
            return None
        stacked = torch.stack([values for values, _ in self._pending])
        anywhere = any_rank_each(~torch.isfinite(stacked[:, -2]), info)
        rows = torch.cat([stacked, anywhere[:, None].to(stacked.dtype)], 1).tolist()  # the one host sync of the logging
        last = None
        for (*row, skipped, any_bad), (_, ids) in zip(rows, self._pending):
            self.bad_in_row = self.bad_in_row + 1 if any_bad else 0
            if math.isfinite(row[-1]):
                self.steps += 1
                for key, value in zip(LOGGED_LOSSES + ("loss",), row):
                    self.sums[key] += value
                last = row[-1]
                self.skipped += int(skipped)  # a finite loss, gradients that overflowed fp16 or NaN on another rank
            else:
                self.skipped += 1
                print(f"non-finite loss skipped (epoch {epoch}, image ids {ids}): "
                      f"{ {k: round(v, 4) for k, v in zip(LOGGED_LOSSES, row)} }")
            if self.bad_in_row >= MAX_BAD_STEPS:
                raise DivergenceError(f"epoch {epoch}: {self.bad_in_row} non-finite losses in a row; lower --lr "
                                      "or check the images named above (under torchrun, by the ranks that had them).")
        self._pending.clear()
        return last

    def saved(self, info: DistInfo, device: torch.device, agreed: bool) -> dict[str, Any]:
        """The meter as an interrupted checkpoint keeps it. ``agreed`` (a stop every rank takes at
        the same step): its sums and steps totalled over the ranks, an all-reduce, so the resumed
        epoch averages every rank's steps, not rank 0's counted once per rank; otherwise (an error
        on rank 0 alone) rank 0's own. Skipped updates are counted once, as each rank counts them."""
        state = asdict(self)
        if agreed and info.enabled:
            totals = sum_across({**self.sums, "_steps": self.steps}, info, device)
            state.update(steps=int(totals.pop("_steps")), sums=totals)
        return state

    @classmethod
    def resumed(cls, saved: dict[str, Any], info: DistInfo) -> "EpochMeter":
        """A rank's meter for an epoch continued from ``saved``: rank 0 carries the sums and steps
        so far, the others start theirs at zero, so ``summary`` counts each step once; every rank
        keeps the step count (reads stay aligned) and the skipped updates (``summary`` divides
        their total by the ranks)."""
        meter = cls(**saved)
        if not info.is_main:
            meter.sums, meter.steps = dict.fromkeys(meter.sums, 0.0), 0
        return meter

    def summary(self, info: DistInfo, device: torch.device) -> dict[str, float]:
        totals = sum_across({**self.sums, "_steps": self.steps, "_skipped": self.skipped}, info, device)
        steps = max(totals.pop("_steps"), 1)
        row = {f"train_{k}": v / steps for k, v in totals.items() if k != "_skipped"}
        # an update is skipped on every rank together (the gradients are all-reduced): counted once
        row["skipped_steps"] = int(round(totals["_skipped"] / info.world_size))
        row["step_seconds"] = round(self.seconds / max(self.batches, 1), 3)
        return row


def train_one_epoch(model: nn.Module, loader: DataLoader, opt: "Optimisation", device: torch.device,
                    args: argparse.Namespace, epoch: int, meter: EpochMeter, stop: StopRequest,
                    info: DistInfo) -> None:
    """Train steps until the loader ends or a stop is requested; no host sync per step but
    the model's own (the losses are read every READ_EVERY steps, see ``EpochMeter``)."""
    model.train()
    bar = progress(loader, f"epoch {epoch}/{args.epochs}", show=info.is_main)
    for images, targets in bar:
        if _stop_requested(stop, meter.batches, info, device):
            break
        start = time.time()
        opt.schedule.step()
        train_step(model, images, targets, opt, meter, device, args.use_amp, loader.dataset)
        meter.seconds += time.time() - start
        if meter.batches % READ_EVERY == 0:
            _show_loss(bar, meter.read(epoch, info))
    _show_loss(bar, meter.read(epoch, info))


def train_step(model: nn.Module, images: Sequence[torch.Tensor], targets: Sequence[dict], opt: "Optimisation",
               meter: EpochMeter, device: torch.device, use_amp: bool, dataset: Any = None) -> None:
    """One optimisation step; its losses go to ``meter`` (still on the device)."""
    images, targets = to_device(images, targets, device)
    try:  # the backward pass holds the most memory: it runs out there as often as in the forward
        losses = _forward_losses(model, images, targets, device, use_amp)
        loss = sum(losses.values())
        # A non-finite loss makes every gradient NaN (on every DDP rank after the all-reduce, where
        # a zeroed loss would let the other ranks step alone), so the optimizer skips the update.
        skipped = opt.step(model, loss * torch.where(torch.isfinite(loss), 1.0, math.nan))
    except torch.OutOfMemoryError as err:
        raise memory_error(err, images, targets, dataset) from err
    meter.add(losses, loss, [t["image_id"] for t in targets], skipped)


def _stop_requested(stop: StopRequest, batches: int, info: DistInfo, device: torch.device) -> bool:
    """The signal flag; under torchrun it is agreed across ranks (an all-reduce and a host sync)
    only every READ_EVERY steps, at the same steps on every rank."""
    if not info.enabled:
        return stop.requested
    return batches % READ_EVERY == 0 and any_rank(stop.requested, info, device)


def _show_loss(bar: Any, loss: float | None) -> None:
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
        for images, targets in progress(loader, "val loss", show=info.is_main):
            images, targets = to_device(images, targets, device)
            with autocast(device, use_amp):
                losses = model(images, targets)
            total = sum(losses.values())
            per_batch.append(torch.stack([losses[k] if k in losses else torch.zeros_like(total)
                                          for k in LOGGED_LOSSES] + [total]))
    sums = dict.fromkeys(LOGGED_LOSSES + ("loss",), 0.0)
    rows = torch.stack(per_batch).tolist() if per_batch else []  # one host sync, after the last batch
    for row in rows:
        for key, value in zip(sums, row):
            sums[key] += value
    batches = len(rows)
    totals = sum_across({**sums, "_batches": batches}, info, device)
    batches = max(totals.pop("_batches"), 1)
    return {f"val_{k}": v / batches for k, v in totals.items()}


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


def _forward_losses(model: nn.Module, images: list, targets: list, device: torch.device,
                    use_amp: bool) -> dict[str, torch.Tensor]:
    """The training forward, under autocast with ``--use_amp``; a seam the fault tests wrap."""
    with autocast(device, use_amp):
        return model(images, targets)


def memory_error(err: torch.OutOfMemoryError, images: Sequence[torch.Tensor], targets: Sequence[dict],
                 dataset: Any) -> DeviceMemoryError:
    """Out of memory as one line: which images (their size and cells), how much was asked for,
    and the flags that shrink a step; the traceback would name only a kernel."""
    asked = re.search(r"Tried to allocate [\d.]+ [KMGT]?i?B", str(err))
    shown = ", ".join(f"{dataset.name_of(t['image_id']) if dataset is not None else t['image_id']} "
                      f"({img.shape[-2]}x{img.shape[-1]}, {len(t['labels'])} cells)" for img, t in zip(images, targets))
    return DeviceMemoryError(f"{shown}: out of memory in a training step{f' ({asked.group(0)})' if asked else ''}; "
                             "try a smaller --max_size, --batch_size 1, fewer --rpn_post_nms_top_n_train or "
                             "--box_batch_size_per_image, or --use_amp.")


def to_device(images: Sequence[torch.Tensor], targets: Sequence[dict], device: torch.device) -> tuple[list, list]:
    """Images and target dicts on ``device``, packed masks included (the model reads them there);
    boxes are checked here, on the host, where torchvision's check would cost a sync per image."""
    check_boxes(targets)
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: v.to(device, non_blocking=True) if isinstance(v, (torch.Tensor, PackedMasks)) else v
                for k, v in t.items()} for t in targets]
    return images, targets
