"""Repeat-factor sampling (Gupta et al., LVIS 2019) so that rare classes are seen more often.

Classes 3 and 4 hold about 2% of the instances: with uniform sampling the heads see them a
few times per epoch. Oversampling whole images (not instances) keeps every image's masks
intact and needs no change to the loss. Each class gets r_c = max(1, sqrt(t / f_c)), where
f_c is the share of training images that contain it; an image repeats r_i = max r_c over its
classes, rounded stochastically each epoch so that fractional factors hold on average.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from dataloader import LabelledImages
from distributed import DistInfo, ResumableSampler


def train_sampler(dataset: LabelledImages, info: DistInfo, seed: int,
                  repeat_thresh: float) -> ResumableSampler | RepeatFactorSampler:
    """The training sampler for ``--repeat_thresh``: both kinds share set_epoch/skip, so
    the loop and resuming treat them alike."""
    if repeat_thresh <= 0:
        return ResumableSampler(dataset, info, shuffle=True, seed=seed)
    labels = [inst.labels for inst in dataset.instances]
    return RepeatFactorSampler(repeat_factors(labels, repeat_thresh), info, seed)


class SeededDraws(Sampler[tuple[int, int]]):
    """The training sampler's indices, each paired with the seed its augmentation draws from
    (``LabelledImages.__getitem__``), made of (seed, epoch, rank, place in the epoch): a
    resumed epoch, and any ``--num_workers``, augment every sample as an uninterrupted run does.
    The workers' own generators could not: they are seeded once per run, from the main
    process's. ``sampler``'s epoch and ``skip`` are read at each iteration."""

    def __init__(self, sampler: ResumableSampler | RepeatFactorSampler, seed: int) -> None:
        self.sampler, self.seed = sampler, seed

    def __iter__(self) -> Iterator[tuple[int, int]]:
        s = self.sampler
        for place, index in enumerate(s, start=s.skip):
            entropy = [self.seed & 0xFFFFFFFF, s.epoch, s.rank, place]
            yield index, int(np.random.SeedSequence(entropy).generate_state(1)[0])

    def __len__(self) -> int:
        return len(self.sampler)


def class_repeat_factors(image_labels: Sequence[Sequence[int]], thresh: float) -> dict[int, float]:
    """r_c per class present, so a run can log how much each class is oversampled."""
    if not image_labels:
        return {}
    counts: dict[int, int] = {}
    for labels in image_labels:
        for c in {int(c) for c in labels}:
            counts[c] = counts.get(c, 0) + 1
    n = len(image_labels)
    return {c: _class_factor(k / n, thresh) for c, k in sorted(counts.items())}


def balanced_class_weights(image_labels: Sequence[Sequence[int]], num_classes: int) -> list[float]:
    """Classification-loss weights ``[background, class 1, ...]`` for ``--class_balance``: each
    class weighs 1 / sqrt(its share of the training instances), scaled so that the instances
    of the training set weigh 1 on average; the background and a class without instances 1."""
    counts = np.zeros(num_classes, dtype=np.float64)
    for labels in image_labels:
        np.add.at(counts, np.asarray(labels, dtype=np.int64), 1)
    seen = counts[1:] > 0
    raw = np.where(seen, 1.0 / np.sqrt(np.maximum(counts[1:], 1) / max(counts[1:].sum(), 1)), 1.0)
    mean = (raw * counts[1:]).sum() / max(counts[1:].sum(), 1)
    return [1.0, *(float(w) for w in np.where(seen, raw / mean, 1.0))]


def repeat_factors(image_labels: Sequence[Sequence[int]], thresh: float) -> list[float]:
    """r_i per image: the factor of its rarest class, 1 for an image with no instances
    (background-only images are neither dropped nor oversampled)."""
    per_class = class_repeat_factors(image_labels, thresh)
    return [max((per_class[int(c)] for c in labels), default=1.0) for labels in image_labels]


def repeat_indices(factors: Sequence[float], seed: int, epoch: int) -> list[int]:
    """One epoch's shuffled image list, a pure function of (seed, epoch) so every rank
    builds the same list and a resumed epoch replays the same order."""
    # SeedSequence needs non-negative entries; the modulo keeps negative seeds usable.
    rng = np.random.default_rng([seed % 2**64, epoch])
    factors_arr = np.asarray(factors, dtype=np.float64)
    whole = np.floor(factors_arr)
    counts = whole.astype(np.int64) + (rng.random(len(factors_arr)) < factors_arr - whole)
    indices = np.repeat(np.arange(len(factors_arr)), counts)
    rng.shuffle(indices)
    return indices.tolist()


class RepeatFactorSampler(Sampler[int]):
    """Distributed repeat-factor sampler with the interface of ``ResumableSampler``.

    The epoch list is padded to a multiple of the world size and sharded ``rank::world_size``
    as DistributedSampler does, so every rank runs the same number of steps (DDP would hang
    otherwise). Its length varies by epoch; ``__len__`` is that of the current epoch.
    """

    def __init__(self, factors: Sequence[float], info: DistInfo, seed: int) -> None:
        if any(f < 1 for f in factors):
            raise ValueError("repeat factors must be >= 1 (an image is never dropped).")
        self.factors = list(factors)
        self.num_replicas = info.world_size
        self.rank = info.rank
        self.seed = seed
        self.skip = 0
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._shard = _shard(repeat_indices(self.factors, self.seed, epoch), self.rank, self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self._shard[self.skip:])

    def __len__(self) -> int:
        return max(len(self._shard) - self.skip, 0)


def _class_factor(image_fraction: float, thresh: float) -> float:
    if thresh <= 0:
        return 1.0
    return max(1.0, math.sqrt(thresh / image_fraction))


def _shard(indices: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's part of the list, padded by wrapping around as DistributedSampler does."""
    if not indices:
        return []
    total = math.ceil(len(indices) / world_size) * world_size
    padded = (indices * math.ceil(total / len(indices)))[:total]
    return padded[rank:total:world_size]
