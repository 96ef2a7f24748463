"""Plain reference implementations the tests compare the project's fast paths against: the
obvious code, written for clarity, never for speed (no benchmark imports them)."""
from __future__ import annotations

import math

import torch
from torch import nn

from engine import to_device
from history import LOSS_KEYS


def per_step_read_step(model: nn.Module, images: list, targets: list, optimizer: torch.optim.Optimizer,
                       clip_grad: float, device: torch.device) -> dict[str, float]:
    """One training step the straightforward way: every loss read on the host, the update
    made only when the loss is finite, the gradients clipped first; returns the losses read
    (NaN for a skipped step)."""
    images, targets = to_device(images, targets, device)
    losses = model(images, targets)
    loss = sum(losses.values())
    if not math.isfinite(loss.item()):
        return dict.fromkeys(LOSS_KEYS, math.nan)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad > 0:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    return {k: losses[k].item() for k in LOSS_KEYS}
