"""What one training step changes besides the model, and how the learning rate moves:
the fused AdamW that skips a non-finite step on the device, the AMP scaler, the weight
average, clipping, and the per-step warm-up then cosine or plateau schedule. Saved and
restored together (``Optimisation.state_dict``), so a resumed run continues exactly (in one
process: under torchrun only rank 0's random state is saved, and each other rank reseeds).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ema import ModelEMA


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
            # its warm-up ramp, like the schedule's, at the same place in the epochs
            self.ema.updates = self.schedule.same_place(self.ema.updates, state["scheduler"])


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


class LRSchedule:
    """Per-step linear warm-up from 0, then cosine to ``eta_min`` or ReduceLROnPlateau."""

    def __init__(self, optimizer: torch.optim.Optimizer, args: argparse.Namespace, steps_per_epoch: int) -> None:
        self.optimizer = optimizer
        self.base_lr = args.lr
        self.eta_min = args.eta_min
        self.cosine = args.use_cosine
        self.steps_per_epoch = steps_per_epoch
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

    def same_place(self, count: int, saved: dict[str, Any]) -> int:
        """A step count of the run that saved ``saved`` (this schedule's state), at the same place
        in the epochs at this run's steps per epoch (unchanged for a record from before they were saved)."""
        before = saved.get("steps_per_epoch")
        return round(count * self.steps_per_epoch / before) if before and before != self.steps_per_epoch else count

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "plateau": self.plateau.state_dict(), "base_lr": self.base_lr,
                "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The saved place in the schedule. A ``--lr`` given on resume takes effect in the plateau
        phase too, where the optimizer's saved rate would otherwise stay: the rate is scaled by
        new / saved, keeping the reductions the plateau made. A run resumed with another
        ``--batch_size`` or number of processes takes more or fewer steps an epoch: its step count
        is rescaled to the same place in the epochs, where warm-up and cosine are set."""
        self.steps = self.same_place(state["steps"], state)
        self.plateau.load_state_dict(state["plateau"])
        self.plateau.patience = self.patience  # --patience given on resume wins over the saved one
        saved = state.get("base_lr")  # absent from runs saved before it was recorded
        if saved and saved != self.base_lr and not self.cosine and self.steps > self.warmup_steps:
            for group in self.optimizer.param_groups:
                group["lr"] *= self.base_lr / saved


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, base_lr: float, eta_min: float) -> float:
    """lr of 1-based ``step``: linear from 0 to ``base_lr`` over warm-up, then cosine to ``eta_min``."""
    if step <= warmup_steps:
        return base_lr * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return eta_min + 0.5 * (base_lr - eta_min) * (1 + math.cos(math.pi * progress))
