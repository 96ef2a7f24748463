"""Which device a tool runs on, and how host data reaches it without stalling the GPU queue.

A blocking host-to-device copy (``.to(cuda)`` of pageable memory, ``torch.tensor(list,
device=cuda)``, ``new_tensor``, indexing with a Python list) waits for every kernel queued
before it, as a read back to the host does. Per-step and per-view code therefore builds its
constants from Python scalars or caches them on the device, and moves host-computed arrays with
``to_device``.
"""
from __future__ import annotations

import functools
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch


def default_device(device_arg: str | None) -> torch.device:
    """``--device`` (default: CUDA when present); a CUDA device also becomes the current one, so
    ``--device cuda:1`` puts cuDNN's workspace and every unplaced tensor on GPU 1, not GPU 0."""
    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


GPU_BATCH = 8  # tiles x views per forward pass on a GPU: enough to fill it, and a few GB at most


def prediction_batch(requested: int | None, device: torch.device) -> int:
    """Tiles and views per forward pass: ``requested``, else ``GPU_BATCH`` on CUDA and 1 on a
    CPU (where a bigger batch is no faster and only needs more memory)."""
    if requested is not None:
        return max(int(requested), 1)
    return GPU_BATCH if device.type == "cuda" else 1


def to_device(data: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host data (a numpy array or a CPU tensor) on ``device``. To CUDA it goes through pinned
    memory with a non-blocking copy, which the caching host allocator keeps alive until the
    copy is done; on a CPU it is the same memory."""
    tensor = torch.as_tensor(data)
    if device.type == "cuda" and torch.cuda.is_available():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def scale_boxes(boxes: torch.Tensor, scale_x: float, scale_y: float) -> torch.Tensor:
    """[K, 4] (x1, y1, x2, y2) boxes scaled per axis by Python numbers: torchvision's
    ``resize_boxes`` builds its ratios with ``torch.tensor(..., device=)``, a blocking copy each."""
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    return torch.stack((x1 * scale_x, y1 * scale_y, x2 * scale_x, y2 * scale_y), dim=1)


def counts(index: torch.Tensor, length: int) -> list[int]:
    """How often each of 0..length-1 occurs in ``index``, on the host. One read (a host sync the
    caller marks): CUDA's ``bincount`` reads the index's range first, a second one."""
    found = torch.zeros(length, dtype=torch.int64, device=index.device)
    return found.index_add_(0, index.long(), torch.ones_like(index, dtype=torch.int64)).tolist()


def amp_dtype(device: torch.device, enabled: bool = True, even_if_slow: bool = False) -> torch.dtype | None:
    """What ``--use_amp`` computes in on ``device``: fp16 on CUDA; bf16 on a CPU with bf16
    instructions (there are no fp16 kernels on a CPU); None (float32) without the flag, and on a
    CPU without bf16 instructions, where bf16 is several times slower than float32 (9.3x a
    training step on an AVX2 EPYC: benchmarks/RESULTS.md) and the flag would only cost time.
    ``even_if_slow`` measures that cost (``benchmarks/step_time.py --compare_amp``)."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and not (even_if_slow or native_bf16()):
        return None
    return torch.bfloat16


def precision(device: torch.device, use_amp: bool) -> str:
    """What ``--use_amp`` (or its absence) computes in on ``device``, by name, for benchmark rows."""
    return str(amp_dtype(device, use_amp) or torch.float32).removeprefix("torch.")


def autocast(device: torch.device, enabled: bool, even_if_slow: bool = False) -> Any:
    """Mixed precision for ``--use_amp`` (``amp_dtype``), or nothing; says once where the flag
    computes in float32."""
    dtype = amp_dtype(device, enabled, even_if_slow)
    if dtype is None and enabled and device.type == "cpu":
        _note_float32_amp()
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


_BF16_NOTED: list[bool] = []  # said once a process


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX): ``amp_dtype``."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # another torch: assume it does, as before this check
        return True


def _note_float32_amp() -> None:
    """Say once that ``--use_amp`` computes in float32 on this CPU, and why."""
    if _BF16_NOTED or torch.utils.data.get_worker_info() is not None:
        return
    _BF16_NOTED.append(True)
    print("note: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX), where bf16 runs many times slower "
          "than float32, so --use_amp computes in float32 here (said once)")
