"""torch.distributed from the environment torchrun sets, and the few collectives the loop needs.

Without torchrun (no WORLD_SIZE) everything here is a no-op, so the single-process path and
the distributed path are the same code.
"""
from __future__ import annotations

import os
import random
import signal
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from devices import default_device
from errors import UsageError

PROCESS_GROUP_TIMEOUT = timedelta(hours=1)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_arg: str | None) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU) and pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(), default_device(device_arg)
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = torch.cuda.is_available() and (device_arg is None or device_arg.startswith("cuda"))
    if use_cuda:
        if info.local_rank >= torch.cuda.device_count():
            raise UsageError(f"torchrun started {info.local_rank + 1} or more processes on this node, which has "
                             f"{torch.cuda.device_count()} GPU(s); pass --nproc_per_node {torch.cuda.device_count()}.")
        if device_arg not in (None, "cuda", f"cuda:{info.local_rank}"):
            print(f"note: rank {info.rank}: --device {device_arg} is not used under torchrun; each process "
                  f"takes the GPU of its local rank (cuda:{info.local_rank}).")
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        # Rank 0 alone scores validation (COCOeval) while the others wait in a broadcast: allow
        # an hour, not NCCL's default ten minutes, before a wait counts as a hang.
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return info, torch.device(f"cuda:{info.local_rank}" if use_cuda else "cpu")


def decorrelate_ranks(info: DistInfo) -> None:
    """Give every rank but rank 0 its own random streams (torch, numpy, random), drawn from the
    shared ones: the ranks start from one seed (the same initial weights), so their random
    crops, flips and DataLoader worker seeds would otherwise repeat in lockstep. Rank 0's
    streams, and with them a single-process run, are left as they are."""
    if info.rank == 0:
        return
    seed = int(torch.randint(0, 2 ** 31 - 1, (info.world_size,))[info.rank])
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def sum_across(values: dict[str, float], info: DistInfo, device: torch.device) -> dict[str, float]:
    """Sum each value over all ranks (losses and counts, averaged by the caller)."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist()))


def gather_lists(items: list, info: DistInfo) -> list:
    """Every rank's list concatenated on rank 0, which scores them (validation predictions);
    other ranks get an empty list: sending every mask to every rank would cost W times the traffic."""
    if not info.enabled:
        return items
    parts: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(items, parts, dst=0)
    return [x for part in parts for x in part] if parts is not None else []


def broadcast(obj: Any, info: DistInfo) -> Any:
    """Rank 0's value on every rank, so all ranks take the same decisions (early stop)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def share_buffers(module: nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank, before the ranks score their
    shards: DDP broadcasts them only as a forward starts, so after the last step each rank's
    statistics hold its own last batch (``--use_attn`` without ``--sync_bn``), and the shards
    were scored with weights a little unlike those rank 0 saves. Once a validation, no host sync."""
    if not info.enabled:
        return
    for layer in module.modules():  # frozen BatchNorm's buffers never change: they are left alone
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats:
            for buffer in layer.buffers():
                dist.broadcast(buffer, src=0)


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank: every rank must call it at the same point."""
    if not info.enabled:
        return flag
    flags = torch.full((1,), flag, dtype=torch.bool, device=device)  # filled on the device: no host-to-device copy
    return bool(any_rank_each(flags, info).item())  # host sync: the ranks' answer, read where the caller agreed to wait


def any_rank_each(flags: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Each element of a bool tensor set where it is set on any rank (an all-reduce, no host
    sync: the caller reads it with what it reads anyway); every rank must call it at the same point."""
    if not info.enabled:
        return flags
    tensor = flags.to(torch.uint8)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.bool()


class ResumableSampler(DistributedSampler):
    """DistributedSampler (also for one process) that can skip the batches an interrupted
    epoch already trained, without loading them."""

    def __init__(self, dataset: Any, info: DistInfo, shuffle: bool, seed: int) -> None:
        super().__init__(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=shuffle, seed=seed)
        self.skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return max(super().__len__() - self.skip, 0)


def epoch_samples_done(partial: dict[str, Any] | None, batch_size: int, world_size: int) -> int:
    """The samples each rank skips to continue a stopped epoch (``partial``, saved by training:
    ``samples``, the epoch's samples trained over all ranks). The samplers shard the epoch's order
    ``rank::world_size``, so those were the order's first ``samples``. With another
    ``--batch_size`` or number of processes each rank skips its share of them, rounded down: a
    sample or so a rank is trained twice, none left out, and every rank skips alike (DDP keeps
    them in step). A record from before ``samples``: ``batches`` of its ``batch_size`` a rank."""
    if not partial:
        return 0
    done = partial.get("samples", partial["batches"] * partial.get("batch_size", batch_size) * world_size)
    return done // world_size


def samples_trained(skipped: int, batches: int, batch_size: int, world_size: int) -> int:
    """The epoch's samples trained over all ranks, for ``epoch_samples_done``: each rank skipped
    ``skipped`` (trained before this process started), then trained ``batches`` of ``batch_size``."""
    return (skipped + batches * batch_size) * world_size


WORKER_STOP_GRACE = 600  # seconds a loader worker outlives a SIGTERM: torchrun --shutdown_timeout's advice


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: SIGTERM and SIGINT are the main process's to
    handle (``StopRequest``). torchrun, Slurm and a terminal's Ctrl-C signal the whole process
    group; PyTorch's workers died of a SIGTERM, and the main process then crashed on the lost
    worker instead of saving. A SIGTERM now arms an alarm instead: the worker serves the main
    process for up to WORKER_STOP_GRACE seconds while it saves (a stop during a validation
    longer than that still ends in the lost-worker crash), ends with the loader as usual, and a
    stuck one (a hung file system) dies at the alarm, delaying the exit by that much at most."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "alarm"):  # POSIX; elsewhere a SIGTERM ends the worker, as before
        signal.signal(signal.SIGTERM, _stop_later)


def _stop_later(signum: int, frame: Any) -> None:
    remaining = signal.alarm(WORKER_STOP_GRACE)
    if remaining:  # a second SIGTERM (the loader's own terminate()) keeps the first one's end
        signal.alarm(remaining)


class StopRequest:
    """SIGTERM (a preempted job) or Ctrl-C asks the loop to stop after the current step and
    save (during validation: once it ends, so the epoch's result is kept); a second Ctrl-C stops
    at once, losing the steps since the last save."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a resumable checkpoint after the current step (during "
              "validation: when it ends); a second Ctrl-C stops at once, without saving", flush=True)
