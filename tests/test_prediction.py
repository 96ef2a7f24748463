"""The prediction path: tiles, views, candidate selection, the batched merge and its cap.

A two-stage oracle (``detect`` / ``masks``, the interface ``predictor.MaskRCNNStages`` gives a
Mask R-CNN) returns every cell piece it sees, as a perfect model would: cells cut by a tile
edge come back cut, flipped views come back flipped.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from torchvision.models.detection.roi_heads import paste_masks_in_image

from coco import encode_packed, paste_masks
from conftest import mask_boxes
from masks import PackedMasks
from merging import (_rival_pairs, average_masks, consensus, greedy_mask_merge, pair_intersections, resample_masks,
                     same_cell_copies, same_cell_pairs, select_candidates, selected, take, votes)
from predictor import Settings, on_host, predict_images, state_bytes
from synthetic import synth_image
from tiling import max_cover, tile_grid


class CellOracle:
    """Reads instance ids from channel 0; a cell's score depends on its id alone, so every
    view of it scores the same. Records the size of every forward pass."""

    detections_per_img = 1000

    def __init__(self) -> None:
        self.detect_calls: list[int] = []
        self.mask_calls: list[int] = []

    def detect(self, crops: list[torch.Tensor], cap: int, per_class: int = 0) -> tuple[list, list[dict]]:
        self.detect_calls.append(len(crops))
        state, dets = [], []
        for crop in crops:
            ids = crop[0].round().long()
            values = ids.unique()
            values = values[values > 0]
            masks = ids[None] == values[:, None, None]
            boxes, _ = mask_boxes(masks)
            scores = 0.3 + 0.6 * (values.float() * 0.618 % 1.0)
            order = torch.argsort(scores, descending=True)[:cap]
            state.append((masks[order], boxes[order]))
            dets.append({"boxes": boxes[order], "scores": scores[order], "labels": values[order] % 4 + 1})
        return state, dets

    def masks(self, state: list, picks: list[torch.Tensor]) -> torch.Tensor:
        self.mask_calls.append(sum(len(p) for p in picks))
        out = [torch.zeros((0, 28, 28))]
        for (masks, boxes), pick in zip(state, picks):
            for i in pick.tolist():
                x0, y0, x1, y1 = (int(v) for v in boxes[i])
                crop = masks[i, y0:y1, x0:x1].float()[None, None]
                out.append(F.interpolate(crop, size=(28, 28), mode="bilinear", align_corners=False)[0])
        return torch.cat(out)


def _scene(seed: int, size: tuple[int, int], cells: int = 40) -> torch.Tensor:
    """Channel 0 holds cell ids; a cell split by overlapping ones keeps its largest piece, so
    every cell is one blob (a real model's mask, not a scatter of fragments)."""
    _, labels = synth_image(np.random.default_rng(seed), size, cells)
    ids = np.zeros(size, dtype=np.int64)
    for lab in labels.values():  # one id map; later classes win overlaps, like a painter
        ids[lab > 0] = lab[lab > 0]
    for value in np.unique(ids[ids > 0]):
        pieces, count = ndimage.label(ids == value)
        if count > 1:
            largest = np.argmax(np.bincount(pieces.ravel())[1:]) + 1
            ids[(pieces > 0) & (pieces != largest)] = 0
    image = torch.zeros(3, *size)
    image[0] = torch.from_numpy(ids).float()
    return image


def _cells(out: dict) -> set:
    return {(int(label), *[round(v) for v in box]) for label, box in zip(out["labels"].tolist(), out["boxes"].tolist())}


def test_grid_covers_image_with_overlap() -> None:
    windows = tile_grid(200, 260, 96, 0.4)
    covered = np.zeros((200, 260), bool)
    for y0, x0, y1, x1 in windows:
        assert y1 - y0 == 96 and x1 - x0 == 96
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    assert tile_grid(50, 60, 96, 0.25) == [(0, 0, 50, 60)] == tile_grid(50, 60, 0, 0.25)
    assert max_cover(tile_grid(1000, 1000, 256, 0.25)) == 4 and max_cover([(0, 0, 50, 60)]) == 1
    with pytest.raises(ValueError):
        tile_grid(10, 10, 5, 1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_tiles_and_flips_give_the_cells_of_the_whole_image(seed: int) -> None:
    image = _scene(seed, (200, 260))
    whole = predict_images(CellOracle(), [image], Settings())[0]
    assert len(tile_grid(200, 260, 96, 0.4)) > 4  # cells really are cut by inner tile edges
    for settings in (Settings(tile=96, tile_overlap=0.4, batch_size=3),
                     Settings(tile=96, tile_overlap=0.4, tta_scales=(1.0,), batch_size=5)):
        tiled = predict_images(CellOracle(), [image], settings)[0]
        assert _cells(tiled) == _cells(whole) and len(tiled["scores"]) == len(whole["scores"])
        assert tiled["image_size"] == (200, 260)
        assert torch.all(tiled["scores"][:-1] >= tiled["scores"][1:])


@pytest.mark.parametrize("merge", ["max", "avg"])
def test_a_feature_budget_redetects_instead_of_keeping_and_changes_nothing(merge: str) -> None:
    """Past ``feature_budget`` a chunk's state is dropped after detection and the chunk is
    detected again for its masks (only where it has candidates): the cells, scores and masks
    are those of keeping everything."""
    image = _scene(4, (200, 260))
    settings = Settings(tile=96, tile_overlap=0.4, tta_scales=(1.0,), batch_size=4, merge=merge)
    kept_all, oracle = CellOracle(), CellOracle()
    expected = predict_images(kept_all, [image], settings)[0]
    bounded = predict_images(oracle, [image], replace(settings, feature_budget=0))[0]
    assert torch.equal(bounded["scores"], expected["scores"]) and torch.equal(bounded["labels"], expected["labels"])
    assert torch.equal(bounded["masks"].data, expected["masks"].data)
    chunks = len(kept_all.detect_calls)
    assert chunks < len(oracle.detect_calls) <= 2 * chunks  # the chunks with candidates, detected twice
    assert state_bytes({"a": torch.zeros(3, 4), "b": [torch.zeros(2, dtype=torch.float16)]}) == 3 * 4 * 4 + 2 * 2


def test_prediction_batch_fills_a_gpu_and_stays_1_on_a_cpu() -> None:
    import inference
    from devices import GPU_BATCH, prediction_batch

    assert prediction_batch(None, torch.device("cpu")) == 1 and prediction_batch(None, torch.device("cuda")) == GPU_BATCH
    assert prediction_batch(3, torch.device("cuda")) == 3
    with pytest.raises(SystemExit):
        inference.build_parser().parse_args(["--checkpoint", "x.pth", "--batch_size", "0"])


def test_images_of_one_size_are_pooled_while_their_tiles_and_views_fill_a_batch() -> None:
    from predictor import image_batches

    small, other, large = (50, 60), (50, 61), (200, 200)  # one 64 px tile; one; several
    assert image_batches([small] * 5, Settings(tile=64, batch_size=3)) == [[0, 1, 2], [3, 4]]
    flips = Settings(tile=64, batch_size=8, tta_scales=(1.0,))  # 4 views an image
    assert image_batches([small, small, small, large, small], flips) == [[0, 1], [2], [3], [4]]
    assert len(tile_grid(*large, 64, 0.25)) * 4 > 8  # a large image alone, however many it holds
    assert image_batches([small, other, other, small], Settings(tile=64, batch_size=8)) == [[0], [1, 2], [3]]
    whole = Settings(tile=0, batch_size=3)  # whole images of other sizes: padded together only when asked
    assert image_batches([small, large, small], whole) == [[0], [1], [2]]
    assert image_batches([small, large, small], whole, whole_together=True) == [[0, 1, 2]]


def test_each_image_keeps_its_best_detections_up_to_the_cap() -> None:
    images = [_scene(2, (200, 260), 60), _scene(3, (150, 120), 30)]
    whole = predict_images(CellOracle(), images, Settings())
    jobs = (len(tile_grid(200, 260, 96, 0.4)) + len(tile_grid(150, 120, 96, 0.4))) * 4
    for merge, copies in (("max", 1), ("avg", 4)):  # avg: each candidate's copy from each of the 4 flips
        oracle = CellOracle()
        capped = predict_images(oracle, images, Settings(tile=96, tile_overlap=0.4, tta_scales=(1.0,),
                                                         batch_size=7, detections_per_img=12, merge=merge))
        for full, out in zip(whole, capped):
            assert len(out["scores"]) == 12 == len(out["masks"])
            assert torch.allclose(out["scores"], full["scores"][:12])
        assert sum(oracle.detect_calls) == jobs and max(oracle.detect_calls) == 7  # views batched across images
        assert len(oracle.mask_calls) == len(oracle.detect_calls)
        assert sum(oracle.mask_calls) == 2 * 12 * copies  # masks: the candidates (and their copies) only


class FragmentOracle(CellOracle):
    """Each cell comes back twice: whole, and its left third scoring just below it, as a real
    model's fragment. A box NMS keeps both (box IoU about 1/3); the mask merge drops the third."""

    def detect(self, crops: list[torch.Tensor], cap: int, per_class: int = 0) -> tuple[list, list[dict]]:
        state, dets = super().detect(crops, cap, per_class)
        for k, ((masks, boxes), found) in enumerate(zip(state, dets)):
            thirds, parts = boxes.clone(), masks.clone()
            thirds[:, 2] = boxes[:, 0] + ((boxes[:, 2] - boxes[:, 0]) / 3).ceil()
            columns = torch.arange(masks.shape[-1])
            parts &= columns[None, None, :] < thirds[:, 2, None, None]
            state[k] = (torch.cat([masks, parts]), torch.cat([boxes, thirds]))
            dets[k] = {"boxes": torch.cat([boxes, thirds]), "scores": torch.cat([found["scores"], found["scores"] - 1e-3]),
                       "labels": torch.cat([found["labels"], found["labels"]])}
        return state, dets


def test_the_class_cap_holds_whole_cells_after_the_merge_drops_fragments() -> None:
    """With a fragment scoring just below each cell, a class cap taken before the mask merge would
    submit half its cells; taken after it, each class holds its best whole cells up to the cap."""
    image = _scene(5, (200, 260), 60)
    whole = predict_images(CellOracle(), [image], Settings())[0]
    out = predict_images(FragmentOracle(), [image], Settings(tile=96, tile_overlap=0.4, detections_per_class=4))[0]
    for label in range(1, 5):
        best = whole["labels"] == label
        mine = out["labels"] == label
        assert int(mine.sum()) == min(4, int(best.sum())) > 0
        assert torch.allclose(out["scores"][mine], whole["scores"][best][:4])  # the class's best cells, whole
    assert _cells(out) <= _cells(whole)


class SkewedOracle(CellOracle):
    """Classes 1 and 2 score above every cell of classes 3 and 4, as a frequent class does."""

    def detect(self, crops: list[torch.Tensor], cap: int, per_class: int = 0) -> tuple[list, list[dict]]:
        state, dets = super().detect(crops, cap, per_class)
        for found in dets:
            found["scores"] = found["scores"] / 2 + 0.5 * (found["labels"] <= 2)
        return state, dets


def test_the_image_cap_follows_the_class_cap_after_the_merge() -> None:
    """An image cap below the classes' caps summed: each class is cut to its cap first, then the
    image keeps its best (as the model's own caps apply in one view), so the surest classes
    cannot take the rarer classes' share before the class cap is applied."""
    image = _scene(5, (200, 260), 60)
    every = predict_images(SkewedOracle(), [image], Settings())[0]
    per_class = torch.cat([torch.nonzero(every["labels"] == c).flatten()[:4] for c in range(1, 5)])
    expected = every["scores"][per_class].sort(descending=True).values[:10]
    tiled = predict_images(SkewedOracle(), [image], Settings(tile=96, tile_overlap=0.4, detections_per_class=4,
                                                             detections_per_img=10))[0]
    assert torch.allclose(tiled["scores"], expected)
    assert int((tiled["labels"] > 2).sum()) == 2  # the rarer classes' best two, after the 4 + 4 surest


def test_candidates_prefer_whole_copies_and_respect_the_cap() -> None:
    boxes = torch.tensor([[0., 0, 10, 10], [0, 0, 10, 6], [20, 20, 30, 30], [21, 20, 30, 30], [50, 50, 60, 60]])
    scores = torch.tensor([0.5, 0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([1, 1, 2, 2, 1])
    cut = torch.tensor([False, True, False, False, False])
    assert sorted(select_candidates(boxes, scores, labels, cut, cap=10, copies=2).tolist()) == [0, 2, 4]
    assert select_candidates(boxes, scores, labels, cut, cap=2, copies=2).tolist() == [2, 4]
    other_class = labels.clone()
    other_class[3] = 3  # another class is no duplicate
    assert len(select_candidates(boxes, scores, other_class, cut, cap=10, copies=2)) == 4


def test_candidates_of_a_dense_image_keep_each_class_best_up_to_the_class_cap() -> None:
    """Tiles and views of an image with 30 sure class-1 cells and 6 less sure class-3 ones:
    an image cap of 12 alone submits class 1 only; with 4 a class, each class's 4 best."""
    xy = torch.arange(36.0)[:, None].repeat(1, 2) * 30
    boxes = torch.cat([xy, xy + 20], dim=1)
    scores = torch.cat([torch.linspace(0.95, 0.6, 30), torch.linspace(0.5, 0.3, 6)])
    labels = torch.tensor([1] * 30 + [3] * 6)
    cut = torch.zeros(36, dtype=torch.bool)
    assert labels[select_candidates(boxes, scores, labels, cut, cap=12, copies=2)].tolist() == [1] * 12
    kept = select_candidates(boxes, scores, labels, cut, cap=12, copies=2, per_class=4)
    assert kept.tolist() == [0, 1, 2, 3, 30, 31, 32, 33]  # merge order: by score


def _random_packed(rng: np.random.Generator, n: int, size: tuple[int, int]) -> PackedMasks:
    crops, boxes = [], []
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(1, 12, 2))
        y, x = int(rng.integers(0, size[0] - h + 1)), int(rng.integers(0, size[1] - w + 1))
        crops.append(rng.random((h, w)) < rng.choice([0.0, 0.5, 1.0]))
        boxes.append([x, y, x + w, y + h])
    return PackedMasks.from_crops(crops, np.array(boxes), size)


def test_pair_intersections_and_take_are_pixel_exact() -> None:
    rng = np.random.default_rng(0)
    packed = _random_packed(rng, 30, (25, 30))
    full = packed.full().bool()
    first, second = torch.triu_indices(30, 30, 1)
    expected = (full[first] & full[second]).sum(dim=(1, 2))
    assert torch.equal(pair_intersections(packed, first, second, chunk_pixels=50), expected)  # many chunks
    index = torch.tensor([5, 0, 29, 5])
    assert torch.equal(take(packed, index).full(), packed.full()[index])
    chosen = torch.from_numpy(rng.random(30) < 0.5)
    picked, pixels = selected(chosen, packed.offsets.diff())
    assert torch.equal(picked, chosen.nonzero().flatten())
    assert pixels == sum(int(c.numel()) for c in (packed.crop(i) for i in picked.tolist())) > 0
    given = take(packed, picked, pixels)  # the total given, not read back
    assert torch.equal(given.data, take(packed, picked).data) and torch.equal(given.full(), full[picked].to(torch.uint8))
    none, nothing = selected(torch.zeros(30, dtype=torch.bool), packed.offsets.diff())
    assert len(none) == 0 and nothing == 0 and len(take(packed, none, nothing)) == 0


def test_results_moved_to_the_host_are_the_same_detections() -> None:
    """``on_host`` copies every field of a batch's detections (here host to host: the values)."""
    rng = np.random.default_rng(3)
    packed = _random_packed(rng, 6, (20, 24))
    dets = {"boxes": torch.rand(6, 4, dtype=torch.float16), "scores": torch.rand(6), "labels": torch.arange(6),
            "masks": packed, "image_size": (20, 24)}
    (moved,) = on_host([dets])
    assert moved["boxes"].dtype == torch.float32 and torch.equal(moved["boxes"], dets["boxes"].float())
    assert torch.equal(moved["scores"], dets["scores"]) and torch.equal(moved["labels"], dets["labels"])
    assert torch.equal(moved["masks"].full(), packed.full()) and moved["image_size"] == (20, 24)
    assert on_host([]) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the queued copies and their one wait need CUDA")
def test_results_moved_from_cuda_are_pinned_and_complete() -> None:
    packed = _random_packed(np.random.default_rng(4), 500, (200, 240))
    on_device = PackedMasks(packed.data.cuda(), packed.boxes.cuda(), packed.offsets.cuda(), packed.size)
    dets = {"boxes": torch.rand(500, 4, device="cuda"), "scores": torch.rand(500, device="cuda"),
            "labels": torch.arange(500, device="cuda"), "masks": on_device, "image_size": (200, 240)}
    (moved,) = on_host([dets])
    assert moved["boxes"].device.type == "cpu" and moved["masks"].data.is_pinned()
    assert torch.equal(moved["boxes"], dets["boxes"].cpu()) and torch.equal(moved["masks"].full(), packed.full())


def test_greedy_mask_merge_equals_the_one_at_a_time_greedy() -> None:
    rng = np.random.default_rng(1)
    for _ in range(5):
        packed = _random_packed(rng, 40, (20, 20))
        labels = torch.from_numpy(rng.integers(1, 3, 40))
        key = torch.from_numpy(rng.random(40))
        full = packed.full().bool()
        areas = full.sum(dim=(1, 2))
        kept: list[int] = []
        for i in torch.argsort(key, descending=True).tolist():  # the reference: one detection at a time
            rivals = [k for k in kept if labels[k] == labels[i]]
            if not any((full[i] & full[k]).sum() > 0.5 * min(areas[i], areas[k]) for k in rivals):
                kept.append(i)
        got = greedy_mask_merge(packed, labels, key, match_thresh=0.5)
        assert sorted(got.nonzero().flatten().tolist()) == sorted(kept)


def test_rival_pairs_sweep_finds_every_overlapping_pair_of_a_class_in_merge_order() -> None:
    """The x sweep (no N x N matrix) against all pairs checked one by one, with shared x edges,
    tied and NaN keys, empty boxes, and chunks down to one candidate pair."""
    rng = np.random.default_rng(3)
    n = 60
    corner = rng.integers(0, 40, (n, 2))
    boxes = torch.from_numpy(np.concatenate([corner, corner + rng.integers(0, 12, (n, 2))], axis=1))
    labels = torch.from_numpy(rng.integers(1, 3, n))
    key = torch.from_numpy(rng.integers(0, 4, n).astype(np.float32))
    key[::9] = math.nan  # ranks last, as -inf
    rank = key.nan_to_num(nan=-math.inf)
    expected = []
    for i in range(n):
        for j in range(n):
            x1, y1, x2, y2 = boxes[i].tolist()
            u1, v1, u2, v2 = boxes[j].tolist()
            overlap = x1 < u2 and u1 < x2 and y1 < v2 and v1 < y2
            earlier = rank[i] > rank[j] or (rank[i] == rank[j] and i < j)
            if overlap and earlier and labels[i] == labels[j]:
                expected.append((i, j))
    assert len(expected) > 30
    for chunk in (1, 7, 1 << 22):
        first, second = _rival_pairs(boxes, labels, key, chunk=chunk)
        assert list(zip(first.tolist(), second.tolist())) == expected


def test_batched_paste_and_encoding_equal_torchvision_and_pycocotools() -> None:
    from pycocotools import mask as mask_util

    torch.manual_seed(0)
    height, width = 50, 70
    probs = torch.rand(60, 28, 28)
    boxes = torch.rand(60, 4) * torch.tensor([width, height, width, height])
    boxes[:, 2:] = boxes[:, :2] + torch.rand(60, 2) * 40
    boxes[:3] = torch.tensor([[0.0, 0, width, height], [0, 0, 5, height], [3, 0, 9, height]])  # full-height crops
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    expected = paste_masks_in_image(probs[:, None], boxes, (height, width))[:, 0] > 0.5
    packed = paste_masks(probs, boxes, (height, width), chunk_pixels=500)
    assert (packed.full().bool() != expected).sum() <= 2  # float rounding at the threshold, at most
    full = packed.full().numpy()
    reference = mask_util.encode(np.asfortranarray(full.transpose(1, 2, 0)))
    got = encode_packed(packed, height, width)
    assert [g["counts"] for g in got] == [r["counts"] for r in reference]
    assert encode_packed(PackedMasks.from_crops([], np.zeros((0, 4)), (5, 5)), 5, 5) == []


def test_dihedral_views_map_back_to_the_same_cells() -> None:
    image = _scene(4, (120, 150))  # not square: a quarter turn swaps height and width
    whole = predict_images(CellOracle(), [image], Settings())[0]
    oracle = CellOracle()
    turned = predict_images(oracle, [image], Settings(tile=96, tile_overlap=0.4, tta_scales=(1.0,), dihedral=True,
                                                      batch_size=8))[0]
    assert _cells(turned) == _cells(whole)
    assert sum(oracle.detect_calls) == 8 * len(tile_grid(120, 150, 96, 0.4))


class Partial(CellOracle):
    """Sees only the cells whose score passes ``sees``: a second model that misses some."""

    def __init__(self, sees: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.sees = sees

    def detect(self, crops: list[torch.Tensor], cap: int, per_class: int = 0) -> tuple[list, list[dict]]:
        state, dets = super().detect(crops, cap)
        for k, d in enumerate(dets):
            keep = self.sees(d["scores"])
            state[k] = (state[k][0][keep], state[k][1][keep])
            dets[k] = {key: value[keep] for key, value in d.items()}
        return state, dets


def test_an_ensemble_votes_cells_up_by_the_views_and_models_that_found_them() -> None:
    image = _scene(5, (120, 150))
    whole = predict_images(CellOracle(), [image], Settings())[0]
    base = {cell: score for cell, score in zip(_cells_list(whole), whole["scores"].tolist())}
    confident = Partial(lambda s: s >= 0.6)  # misses some cells
    boosted = predict_images([CellOracle(), confident], [image], Settings(tta_scales=(1.0,), vote_boost=0.1,
                                                                           consensus=False))[0]
    assert set(_cells_list(boosted)) == set(base)  # the union of both models' cells, each once
    for cell, score in zip(_cells_list(boosted), boosted["scores"].tolist()):
        sources = 8 if base[cell] >= 0.6 else 4  # 4 flips of one model, or of both
        assert score == pytest.approx(base[cell] * (1 + 0.1 * (sources - 1)), rel=1e-5), cell
    assert torch.all(boosted["scores"][:-1] >= boosted["scores"][1:])


@pytest.mark.parametrize("tile", [0, 96])
def test_consensus_averages_each_cells_class_score_over_every_view_and_model(tile: int) -> None:
    image = _scene(5, (120, 150))
    whole = predict_images(CellOracle(), [image], Settings())[0]
    base = {cell: score for cell, score in zip(_cells_list(whole), whole["scores"].tolist())}
    assert torch.equal(predict_images(CellOracle(), [image], Settings(consensus=True))[0]["scores"],
                       whole["scores"])  # one view of one model: nothing to average
    unsure = Partial(lambda s: s < 0.6)  # misses the surest cells
    settings = Settings(tile=tile, tile_overlap=0.4, tta_scales=(1.0,), consensus=True)
    mean = predict_images([CellOracle(), unsure], [image], settings)[0]  # tiles of a view count once
    assert set(_cells_list(mean)) == set(base)
    for cell, score in zip(_cells_list(mean), mean["scores"].tolist()):
        found = 8 if base[cell] < 0.6 else 4  # of 8 sources (4 flips x 2 models); the others count 0
        assert score == pytest.approx(base[cell] * found / 8, rel=1e-5), cell
    assert torch.all(mean["scores"][:-1] >= mean["scores"][1:])  # ranked by the mean: agreement first
    order = [base[c] for c in _cells_list(mean)]
    assert order != sorted(order, reverse=True)


def test_consensus_takes_each_sources_best_copy_and_zero_where_it_has_none() -> None:
    cell = torch.tensor([0, 0, 0, 1, 1])
    source = torch.tensor([0, 1, 1, 0, 2])
    scores = torch.tensor([0.9, 0.3, 0.6, 0.2, 0.5])
    assert torch.allclose(consensus(cell, source, scores, 3, 3), torch.tensor([0.5, 0.7 / 3, 0.0]))
    assert torch.equal(votes(cell, source, 3, 3), torch.tensor([2.0, 2.0, 1.0]))  # sources that found each


def test_consensus_pairs_copies_of_the_same_class_only() -> None:
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [1, 0, 10, 10], [0, 0, 10, 10]])
    labels = torch.tensor([1, 2, 1, 2])
    source = torch.tensor([0, 0, 1, 1])  # source 1 saw the cell as class 1 and as class 2
    scores = torch.tensor([0.8, 0.4, 0.2, 0.6])
    cell, other = same_cell_pairs(boxes[:2], labels[:2], boxes, labels)
    assert torch.allclose(consensus(cell, source[other], scores[other], 2, 2), torch.tensor([0.5, 0.5]))


def _cells_list(out: dict) -> list:
    return [(int(label), *[round(v) for v in box]) for label, box in zip(out["labels"].tolist(), out["boxes"].tolist())]


class Doubtful(CellOracle):
    """Finds the same cells a little less sure of them: beside the oracle, its copies are never
    the ones kept, only the ones averaged in."""

    def detect(self, crops: list[torch.Tensor], cap: int, per_class: int = 0) -> tuple[list, list[dict]]:
        state, dets = super().detect(crops, cap)
        return state, [{**d, "scores": d["scores"] * 0.99} for d in dets]


class Blank(Doubtful):
    """Draws no mask: averaged in, its copy of a cell halves the cell's mask probabilities."""

    def masks(self, state: list, picks: list[torch.Tensor]) -> torch.Tensor:
        return torch.zeros_like(super().masks(state, picks))


@pytest.mark.parametrize("tile", [0, 96])
def test_merge_avg_averages_each_cells_mask_with_its_copies(tile: int) -> None:
    image = _scene(6, (150, 200))
    alone = predict_images(CellOracle(), [image], Settings(tile=tile, tile_overlap=0.4))[0]
    pair = [CellOracle(), Blank()]
    best = predict_images(pair, [image], Settings(tile=tile, tile_overlap=0.4, mask_thresh=0.25))[0]
    averaged = predict_images(pair, [image], Settings(tile=tile, tile_overlap=0.4, mask_thresh=0.25, merge="avg"))[0]
    assert _cells_list(averaged) == _cells_list(alone) == _cells_list(best)
    # halved probabilities above 0.25 are the oracle's own above 0.5; max keeps the oracle's copy as is
    assert torch.equal(averaged["masks"].data, alone["masks"].data)
    assert best["masks"].data.sum() > alone["masks"].data.sum()


def test_masks_are_averaged_by_default_with_tta_views_only() -> None:
    assert Settings(tta_scales=(1.0,)).averages and not Settings().averages
    assert Settings(tta_scales=(1.0,)).means_scores and not Settings(tta_scales=(1.0,), consensus=False).means_scores
    assert not Settings().means_scores and Settings(consensus=True).means_scores  # an ensemble's one view: asked
    assert not Settings(tta_scales=(1.0,), merge="max").averages and Settings(merge="avg").averages
    image = _scene(8, (120, 150))
    pair = [CellOracle(), Blank()]
    flips = {"tta_scales": (1.0,), "mask_thresh": 0.25}
    default, averaged, best = (predict_images(pair, [image], Settings(**flips, merge=merge))[0]["masks"].data
                               for merge in (None, "avg", "max"))
    assert torch.equal(default, averaged) and default.sum() < best.sum()


def test_merge_avg_with_one_view_and_model_changes_nothing() -> None:
    image = _scene(7, (150, 200))
    settings = Settings(tile=96, tile_overlap=0.4)
    oracle = CellOracle()
    plain = predict_images(oracle, [image], settings)[0]
    calls = sum(oracle.mask_calls)
    averaged = predict_images(oracle, [image], Settings(tile=96, tile_overlap=0.4, merge="avg"))[0]
    assert sum(oracle.mask_calls) == 2 * calls  # neighbouring tiles of one view are not copies
    assert torch.equal(averaged["scores"], plain["scores"]) and torch.equal(averaged["masks"].data, plain["masks"].data)


def test_same_cell_copies_are_whole_from_other_sources_and_the_best_of_each() -> None:
    cell = torch.tensor([[10., 10, 30, 30]])
    pool = torch.tensor([[10., 10, 30, 30],  # the cell itself (source 0)
                         [11, 10, 30, 31],  # source 0, a neighbouring tile: no copy
                         [10, 11, 31, 30],  # source 1, scores 0.4
                         [10, 10, 31, 30],  # source 1, scores 0.7: source 1's copy
                         [10, 10, 30, 29],  # source 2, cut by a tile edge: no copy
                         [10, 10, 30, 30],  # source 3, another class: no copy
                         [50, 50, 70, 70]])  # source 3, elsewhere
    scores = torch.tensor([0.9, 0.8, 0.4, 0.7, 0.95, 0.9, 0.9])
    labels = torch.tensor([1, 1, 1, 1, 1, 2, 1])
    source = torch.tensor([0, 0, 1, 1, 2, 3, 3])
    cut = torch.tensor([False, False, False, False, True, False, False])
    pairs = same_cell_pairs(cell, labels[:1], pool, labels)
    assert pairs[1].tolist() == [0, 1, 2, 3, 4]
    copy_of, copy = same_cell_copies(*pairs, scores, source, cut, source[:1], n_sources=4)
    assert copy_of.tolist() == [0] and copy.tolist() == [3]


def test_average_masks_resamples_copies_into_the_cells_box() -> None:
    probs = torch.rand(2, 28, 28)
    boxes = torch.tensor([[0., 0, 20, 10], [5, 5, 33, 33]])
    assert torch.allclose(resample_masks(probs, boxes, boxes), probs, atol=1e-5)  # the same box: unchanged
    right = resample_masks(torch.ones(1, 28, 28), torch.tensor([[10., 0, 20, 10]]), boxes[:1])[0]
    assert right[:, :13].max() == 0 and right[:, 15:].min() > 0.999  # the copy covers the box's right half only
    copies = torch.stack([torch.ones(28, 28), torch.zeros(28, 28), torch.ones(28, 28)])
    mean = average_masks(torch.full((2, 28, 28), 0.5), boxes, copies, boxes[[0, 0, 1]], torch.tensor([0, 0, 1]))
    assert torch.allclose(mean[0], torch.full((28, 28), 0.5)) and torch.allclose(mean[1], torch.full((28, 28), 0.75))


class Wider(Doubtful):
    """Finds the cells in boxes 6 px wider to the right and draws each cell's true mask inside
    its own box: a copy in another frame."""

    def detect(self, crops: list[torch.Tensor], cap: int, per_class: int = 0) -> tuple[list, list[dict]]:
        state, dets = super().detect(crops, cap)
        for (masks, boxes), d, crop in zip(state, dets, crops):
            boxes[:, 2] = (boxes[:, 2] + 6).clamp(max=crop.shape[-1])  # the state's boxes: masks() crops these
            d["boxes"] = boxes.clone()
        return state, dets


def _mask_ious(first: dict, second: dict) -> torch.Tensor:
    a, b = first["masks"].full().flatten(1).float(), second["masks"].full().flatten(1).float()
    inter = (a * b).sum(1)
    return inter / (a.sum(1) + b.sum(1) - inter).clamp(min=1)


def test_merge_avg_resamples_copies_from_their_own_boxes() -> None:
    image = _scene(9, (120, 150))
    alone = predict_images(CellOracle(), [image], Settings())[0]
    averaged = predict_images([CellOracle(), Wider()], [image], Settings(merge="avg"))[0]
    assert _cells_list(averaged) == _cells_list(alone)
    assert _mask_ious(averaged, alone).min() > 0.9  # the same cell, seen in two frames, averaged in one


def test_detections_per_img_0_keeps_every_cell_of_a_large_image() -> None:
    """An image holding more cells than the model's cap: 0 keeps each of them, tiled and merged
    once; the model's own cap (here 20) would drop the rest."""
    image = _scene(4, (300, 320), 90)
    cells = len(torch.unique(image[0])) - 1
    oracle = CellOracle()
    oracle.detections_per_img = 20
    assert len(predict_images(oracle, [image], Settings(tile=96, tile_overlap=0.4))[0]["scores"]) == 20
    every = predict_images(oracle, [image], Settings(tile=96, tile_overlap=0.4, detections_per_img=0))[0]
    assert 20 < len(every["scores"]) == cells


def test_an_image_of_many_tiles_shows_its_own_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hundreds of tiles and views of one image take minutes on a CPU: the detection pass gets a
    bar of its own; an image of a few tiles (validation crops) does not."""
    import predictor

    shown: list[tuple[str, bool]] = []

    def recording(iterable, desc, total=None, show=True, initial=0):
        shown.append((desc, show))
        return iterable

    monkeypatch.setattr(predictor, "progress", recording)
    image = _scene(1, (200, 260), 20)
    for tile, show, many in ((64, True, True), (64, False, False), (0, True, False)):  # show False: other ranks
        shown.clear()
        predict_images(CellOracle(), [image], Settings(tile=tile, tile_overlap=0.5, tta_scales=(1.0,)), show=show)
        jobs = len(tile_grid(200, 260, tile, 0.5)) * 4
        assert shown == [(f"{jobs} tiles and views", many)] and (jobs > predictor.MANY_JOBS) == (tile > 0)
