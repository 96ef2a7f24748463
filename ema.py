"""Exponential moving average of the weights (``--ema_decay``).

With a few hundred training images the last epochs' weights jitter from batch to batch;
an average over the recent steps usually scores a little higher and more steadily, at the
cost of one extra copy of the model and a fused update per optimizer step.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn


class ModelEMA:
    """An averaged copy of the model, updated after each optimizer step.

    Floating-point parameters and buffers (BatchNorm statistics) are averaged; integer
    buffers (``num_batches_tracked``) are copied, since an average of counters means nothing.
    The decay ramps up as ``decay * (1 - exp(-updates / warmup_steps))`` (YOLOv5, timm) so
    the average is not dominated by the untrained first weights; ``warmup_steps=0`` keeps
    it constant.
    """

    def __init__(self, model: nn.Module, decay: float, warmup_steps: int = 2000) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"--ema_decay must be in [0, 1), got {decay}.")
        if warmup_steps < 0:
            raise ValueError(f"EMA warmup_steps must be >= 0, got {warmup_steps}.")
        self.module = copy.deepcopy(_unwrap(model)).eval().requires_grad_(False)
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.updates = 0
        # Tensor lists built once: state_dict() rebuilds ~1000 detached views per call, and the
        # views share storage with the modules, so in-place updates of the weights stay visible.
        self._targets = _split(self.module.state_dict())
        self._source: nn.Module | None = None
        self._sources: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    def current_decay(self) -> float:
        """The decay the last update used (that of the next update before the first)."""
        updates = max(self.updates, 1)
        if self.warmup_steps == 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-updates / self.warmup_steps))

    @torch.no_grad()
    def update(self, model: nn.Module, applied: torch.Tensor | None = None) -> None:
        """Fold the model's current weights in; ``model`` may be wrapped in DDP. Its tensors are
        looked up once per model object, so it must not be moved to another device (which
        replaces buffers) after the first update. ``applied`` (a device bool) false: the
        optimizer skipped this step, and the average stays as it is, decided on the device."""
        self.updates += 1
        source = _unwrap(model)
        if source is not self._source:
            self._source, self._sources = source, _split(source.state_dict())
        (floats, others), (source_floats, source_others) = self._targets, self._sources
        if floats and applied is None:
            # lerp_(src, 1 - d) is d * ema + (1 - d) * src, one fused kernel per dtype/device group.
            torch._foreach_lerp_(floats, source_floats, 1.0 - self.current_decay())
        elif floats:  # the weight as a device tensor, 0 on a skipped step: no host read of the flag
            weight = applied.to(floats[0].dtype) * (1.0 - self.current_decay())
            step = torch._foreach_sub(source_floats, floats)  # fused kernels (lerp with a tensor weight is not)
            torch._foreach_mul_(step, weight)
            torch._foreach_add_(floats, step)
        if others:
            torch._foreach_copy_(others, source_others)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the average and the update counter, so the warm-up ramp resumes where it
        stopped; the decay itself stays the one given by the flags."""
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


def _split(state: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The floating-point tensors (averaged) and the others (copied), in state-dict order."""
    values = list(state.values())
    return [v for v in values if v.is_floating_point()], [v for v in values if not v.is_floating_point()]


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel (or any wrapper with ``.module``)."""
    return getattr(model, "module", model)
