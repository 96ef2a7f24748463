"""Repeat-factor sampling against the LVIS formula, and the weight EMA against its closed form."""
from __future__ import annotations

import io
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from distributed import DistInfo, ResumableSampler
from ema import ModelEMA
from sampling import RepeatFactorSampler, class_repeat_factors, repeat_factors, repeat_indices, train_sampler

COMMON, RARE = 90, 10
LABELS = [[1]] * COMMON + [[1, 3]] * RARE  # class 3 in 10% of the images


@pytest.mark.parametrize("thresh", [0.3, 2.0])
def test_factors_follow_the_lvis_formula(thresh: float) -> None:
    r_common = max(1.0, math.sqrt(thresh / 1.0))
    r_rare = max(1.0, math.sqrt(thresh / 0.1))
    assert class_repeat_factors(LABELS, thresh) == pytest.approx({1: r_common, 3: r_rare})
    assert repeat_factors(LABELS, thresh) == pytest.approx([r_common] * COMMON + [r_rare] * RARE)


def test_empty_images_and_disabled_threshold_repeat_once() -> None:
    assert repeat_factors([[], [2], [1, 1, 1]], 0.5) == pytest.approx([1.0, math.sqrt(1.5), math.sqrt(1.5)])
    assert repeat_factors(LABELS, 0.0) == [1.0] * len(LABELS)
    assert repeat_factors([np.array([1, 3]), np.array([1])], 1.0) == pytest.approx([math.sqrt(2), 1.0])


def test_mean_count_per_epoch_matches_the_factors() -> None:
    # Each image's count is floor(r) + Bernoulli(frac r): sd <= 0.5 per epoch, so over 2000
    # epochs the mean has sd <= 0.5 / sqrt(2000) = 0.011 and 0.06 is over 5 sd.
    factors = repeat_factors(LABELS, 0.3)
    epochs = 2000
    counts = np.zeros(len(factors))
    rare_per_epoch = []
    for epoch in range(epochs):
        per_image = np.bincount(repeat_indices(factors, seed=7, epoch=epoch), minlength=len(factors))
        counts += per_image
        rare_per_epoch.append(per_image[COMMON:].sum())
    assert np.abs(counts / epochs - np.asarray(factors)).max() < 0.06
    # 10 rare images: per-epoch sd sqrt(10 * 0.73 * 0.27) = 1.4, so the 2000-epoch mean has sd 0.03.
    assert np.mean(rare_per_epoch) == pytest.approx(RARE * math.sqrt(3), abs=0.2)
    assert min(rare_per_epoch) >= RARE and max(rare_per_epoch) <= 2 * RARE  # each shows once or twice


def test_epoch_list_is_a_function_of_seed_and_epoch() -> None:
    factors = repeat_factors(LABELS, 0.3)
    assert repeat_indices(factors, 3, 5) == repeat_indices(factors, 3, 5)
    assert repeat_indices(factors, 3, 5) != repeat_indices(factors, 3, 6)
    assert repeat_indices(factors, 3, 5) != repeat_indices(factors, 4, 5)
    assert repeat_indices(factors, -1, 0) == repeat_indices(factors, -1, 0)
    one, two = RepeatFactorSampler(factors, DistInfo(), seed=3), RepeatFactorSampler(factors, DistInfo(), seed=3)
    one.set_epoch(5)
    two.set_epoch(5)
    assert list(one) == list(two) == repeat_indices(factors, 3, 5)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_shards_covering_the_epoch(world_size: int) -> None:
    factors = repeat_factors(LABELS, 0.3)
    shards = []
    for rank in range(world_size):
        sampler = RepeatFactorSampler(factors, DistInfo(rank=rank, world_size=world_size), seed=11)
        sampler.set_epoch(2)
        shards.append(list(sampler))
    epoch = repeat_indices(factors, 11, 2)
    assert len({len(s) for s in shards}) == 1  # same step count on every rank, or DDP hangs
    interleaved = [shard[i] for i in range(len(shards[0])) for shard in shards]
    assert len(interleaved) - len(epoch) < world_size
    assert interleaved[:len(epoch)] == epoch  # every position exactly once, padding at the end
    assert interleaved[len(epoch):] == epoch[:len(interleaved) - len(epoch)]


def test_length_follows_the_epoch_and_skip_drops_trained_samples() -> None:
    sampler = RepeatFactorSampler(repeat_factors(LABELS, 0.3), DistInfo(rank=1, world_size=2), seed=0)
    lengths = set()
    for epoch in range(6):
        sampler.set_epoch(epoch)
        full = list(sampler)
        assert len(sampler) == len(full)
        lengths.add(len(full))
        sampler.skip = 5
        assert list(sampler) == full[5:] and len(sampler) == len(full) - 5
        sampler.skip = 0
    assert len(lengths) > 1
    sampler.skip = 10_000
    assert list(sampler) == [] and len(sampler) == 0


def test_train_sampler_picks_the_sampler_from_the_threshold() -> None:
    dataset = _FakeDataset(LABELS)
    assert isinstance(train_sampler(dataset, DistInfo(), seed=0, repeat_thresh=0.0), ResumableSampler)
    sampler = train_sampler(dataset, DistInfo(), seed=0, repeat_thresh=0.3)
    assert isinstance(sampler, RepeatFactorSampler)
    assert sampler.factors == pytest.approx(repeat_factors(LABELS, 0.3))


def test_ema_with_constant_decay_equals_the_closed_form() -> None:
    model, decay, steps = _model(), 0.7, 6
    trajectory = _trajectory(model, steps)
    ema = ModelEMA(model, decay, warmup_steps=0)
    for k in range(1, steps + 1):
        _set_state(model, trajectory[k], k)
        ema.update(model)
    for key in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        expected = decay**steps * trajectory[0][key] + sum(
            (1 - decay) * decay ** (steps - k) * trajectory[k][key] for k in range(1, steps + 1))
        torch.testing.assert_close(ema.module.state_dict()[key].double(), expected, rtol=0, atol=1e-6)
    assert ema.module.state_dict()["1.num_batches_tracked"].item() == steps  # copied, not averaged


def test_ema_stays_still_on_a_skipped_step() -> None:
    """``applied`` false (the optimizer skipped the step) leaves the average as it was; true
    gives the plain update (to rounding: its own fused kernels)."""
    model, decay = _model(), 0.7
    trajectory = _trajectory(model, 2)
    plain, flagged = ModelEMA(model, decay, warmup_steps=0), ModelEMA(model, decay, warmup_steps=0)
    _set_state(model, trajectory[1], 1)
    plain.update(model)
    flagged.update(model, applied=torch.tensor(True))
    before = {k: v.clone() for k, v in flagged.module.state_dict().items()}
    for key, value in before.items():
        torch.testing.assert_close(value, plain.module.state_dict()[key], rtol=1e-6, atol=1e-7)
    _set_state(model, trajectory[2], 2)
    flagged.update(model, applied=torch.tensor(False))
    assert torch.equal(flagged.module.state_dict()["0.weight"], before["0.weight"])
    assert not torch.equal(trajectory[2]["0.weight"].float(), before["0.weight"])


def test_ema_warmup_ramp_equals_the_closed_form() -> None:
    model, decay, warmup, steps = _model(), 0.9, 3, 5
    trajectory = _trajectory(model, steps)
    ema = ModelEMA(model, decay, warmup_steps=warmup)
    for k in range(1, steps + 1):
        _set_state(model, trajectory[k], k)
        ema.update(model)
    d = [decay * (1 - math.exp(-k / warmup)) for k in range(1, steps + 1)]
    assert ema.current_decay() == pytest.approx(d[-1])
    key = "0.weight"
    expected = math.prod(d) * trajectory[0][key] + sum(
        (1 - d[k - 1]) * math.prod(d[k:]) * trajectory[k][key] for k in range(1, steps + 1))
    torch.testing.assert_close(ema.module.state_dict()[key].double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("warmup_steps", [0, 2000])
def test_zero_decay_copies_the_model_exactly(warmup_steps: int) -> None:
    model = _model()
    trajectory = _trajectory(model, 3)
    ema = ModelEMA(model, 0.0, warmup_steps=warmup_steps)
    for k in range(1, 4):
        _set_state(model, trajectory[k], k)
        ema.update(model)
        for key, value in model.state_dict().items():
            assert torch.equal(ema.module.state_dict()[key], value), key


def test_ema_state_round_trip_continues_identically() -> None:
    model = _model()
    trajectory = _trajectory(model, 10)
    ema = ModelEMA(model, 0.8, warmup_steps=3)
    for k in range(1, 6):
        _set_state(model, trajectory[k], k)
        ema.update(model)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    resumed = ModelEMA(_model(seed=99), 0.8, warmup_steps=3)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.updates == 5
    for k in range(6, 11):
        _set_state(model, trajectory[k], k)
        ema.update(model)
        resumed.update(model)
    assert resumed.updates == ema.updates == 10
    for key, value in ema.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[key], value), key


def test_ema_unwraps_ddp_style_wrappers_and_is_a_frozen_eval_copy() -> None:
    model = _model()
    trajectory = _trajectory(model, 2)
    plain, wrapped = ModelEMA(model, 0.5, warmup_steps=0), ModelEMA(_Wrapper(model), 0.5, warmup_steps=0)
    assert isinstance(wrapped.module, nn.Sequential)
    for k in (1, 2):
        _set_state(model, trajectory[k], k)
        plain.update(model)
        wrapped.update(_Wrapper(model))
    for key, value in plain.module.state_dict().items():
        assert torch.equal(wrapped.module.state_dict()[key], value), key
    assert not wrapped.module.training
    assert not any(p.requires_grad for p in wrapped.module.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert wrapped.module(torch.ones(4, 3)).shape == (4, 2)


def test_ema_rejects_a_decay_outside_zero_one() -> None:
    for decay in (-0.1, 1.0):
        with pytest.raises(ValueError, match="ema_decay"):
            ModelEMA(_model(), decay)


class _FakeDataset:
    def __init__(self, labels: list[list[int]]) -> None:
        self.instances = [SimpleNamespace(labels=np.asarray(ls, dtype=np.int64)) for ls in labels]

    def __len__(self) -> int:
        return len(self.instances)


class _Wrapper:
    """Stands in for DistributedDataParallel, which exposes the model as ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def _trajectory(model: nn.Module, steps: int) -> list[dict[str, torch.Tensor]]:
    """States 0..steps in float64 holding float32 values, so the closed form sees exactly what
    the model holds; state 0 is the model as built (what the EMA starts from)."""
    gen = torch.Generator().manual_seed(1)
    start = {k: v.double().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    later = [{k: torch.randn(v.shape, generator=gen).double() for k, v in start.items()}
             for _ in range(steps)]
    return [start] + later


@torch.no_grad()
def _set_state(model: nn.Module, state: dict[str, torch.Tensor], step: int) -> None:
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            value.copy_(state[key])
        else:
            value.fill_(step)


def test_balanced_class_weights_favour_rare_classes_with_mean_one() -> None:
    from sampling import balanced_class_weights

    labels = [[1] * 60 + [2] * 30, [2] * 6 + [3] * 4, []]  # class 1: 60, class 2: 36, class 3: 4, class 4: none
    weights = balanced_class_weights(labels, 5)
    counts = np.array([60, 36, 4])
    raw = 1 / np.sqrt(counts / counts.sum())
    assert weights[0] == 1.0 and weights[4] == 1.0
    assert np.allclose(weights[1:4], raw / ((raw * counts).sum() / counts.sum()))
    assert (np.array(weights[1:4]) * counts).sum() / counts.sum() == pytest.approx(1.0)
    assert weights[3] > weights[2] > weights[1]


def test_class_weighted_classification_loss() -> None:
    import torch.nn.functional as F

    from detector import weighted_fastrcnn_loss

    generator = torch.Generator().manual_seed(0)
    logits, regression = torch.randn(8, 5, generator=generator), torch.randn(8, 20, generator=generator)
    labels = [torch.tensor([1, 0, 3, 0]), torch.tensor([2, 2, 0, -1])]
    weights = [torch.tensor([True, True, True, True]), torch.tensor([True, True, True, False])]
    targets = [torch.randn(4, 4, generator=generator), torch.randn(4, 4, generator=generator)]
    plain = weighted_fastrcnn_loss(logits, regression, labels, targets, weights)
    uniform = weighted_fastrcnn_loss(logits, regression, labels, targets, weights, torch.ones(5))
    assert torch.allclose(plain[0], uniform[0]) and torch.equal(plain[1], uniform[1])
    class_weights = torch.tensor([1.0, 0.5, 1.0, 3.0, 1.0])
    weighted = weighted_fastrcnn_loss(logits, regression, labels, targets, weights, class_weights)
    used = torch.tensor([1, 0, 3, 0, 2, 2, 0])  # the RoIs of weight 1
    expected = F.cross_entropy(logits[:7], used, weight=class_weights)  # torch's weighted mean
    assert torch.allclose(weighted[0], expected) and torch.equal(weighted[1], plain[1])


def test_seeded_draws_augment_alike_with_any_workers_and_after_a_resume(tiny_dataset: dict) -> None:
    """Each sample's window and augmentation come from (seed, epoch, rank, place): two workers
    give the batches one process gives, and an epoch resumed after its first samples gives the
    rest of them, as in the uninterrupted epoch."""
    import argparse

    from torch.utils.data import DataLoader

    from augment import RandomWindow, add_augment_args, build_train_transforms
    from dataloader import LabelledImages, collate_fn, list_samples
    from sampling import SeededDraws

    samples = list_samples(tiny_dataset["train_dir"])
    parser = argparse.ArgumentParser()
    add_augment_args(parser)
    dataset = LabelledImages(samples, list(range(1, len(samples) + 1)), build_train_transforms(parser.parse_args([])),
                             crop_window=RandomWindow(24))
    sampler = ResumableSampler(dataset, DistInfo(), shuffle=True, seed=3)

    def epoch(workers: int = 0, skip: int = 0, number: int = 2) -> list:
        sampler.set_epoch(number)
        sampler.skip = skip
        loader = DataLoader(dataset, batch_size=1, sampler=SeededDraws(sampler, 5), num_workers=workers,
                            collate_fn=collate_fn)
        return [(image[0], target[0]["boxes"]) for image, target in loader]

    def same(a: list, b: list) -> bool:
        return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))

    before = torch.get_rng_state()
    first = dataset[(0, 7)]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generator untouched
    assert torch.equal(dataset[(0, 7)][0], first[0])
    alone = epoch()
    assert len(alone) == len(samples) >= 3
    assert same(epoch(workers=2), alone) and same(epoch(), alone)
    assert same(epoch(skip=2), alone[2:])
    assert not same(epoch(number=3), alone)  # another epoch, other draws
