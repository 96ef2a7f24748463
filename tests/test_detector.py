"""detector.py: torchvision's training path without host syncs gives torchvision's results."""
from __future__ import annotations

import copy

import pytest
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.ops import MultiScaleRoIAlign

from detector import (LevelRoIAlign, _chunks, check_boxes, group_ranks, nms_segments, sample, top_per_image,
                      use_torchvision_detector)
from model import build_model

# Every candidate sampled: the random draws of torchvision and ours then pick the same sets. From
# 100 proposals an image, so the mask head (a CPU step's cost here) runs on tens of positives.
TAKE_ALL = {"rpn_batch_size_per_image": 10 ** 6, "box_batch_size_per_image": 10 ** 6, "rpn_post_nms_top_n_train": 100}
CONFIG = {"weights": "none", "input_scale": 2.0, "max_size": 256, "rpn_post_nms_top_n_train": 300,
          "rpn_pre_nms_top_n_train": 600, "rpn_pre_nms_top_n_test": 600, "rpn_post_nms_top_n_test": 300}


def _boxes(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * (size - 24)
    wh = 4 + torch.rand(n, 2, generator=generator) * 20
    return torch.cat([xy, xy + wh], dim=1)


def _batch(generator: torch.Generator, counts: tuple[int, ...]) -> tuple[list, list]:
    """Images of 64x72 with ``counts`` filled boxes each (0: an image without instances)."""
    images, targets = [], []
    for n in counts:
        boxes = _boxes(n, 64, generator).floor()
        masks = torch.zeros(n, 64, 72, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[i, y1:y2, x1:x2] = 1
        images.append(torch.rand(3, 64, 72, generator=generator))
        targets.append({"boxes": boxes, "labels": torch.randint(1, 5, (n,), generator=generator), "masks": masks})
    return images, targets


def _losses(model: torch.nn.Module, images: list, targets: list) -> tuple[dict, dict]:
    """Losses and parameter gradients of one training forward and backward."""
    torch.manual_seed(0)
    losses = model(images, copy.deepcopy(targets))
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in losses.items()}, grads


@pytest.mark.parametrize("counts", [(6,), (9, 0)])
def test_training_losses_and_gradients_equal_torchvision(counts: tuple[int, ...], shallow: None) -> None:
    torch.manual_seed(0)
    ours = build_model({**CONFIG, **TAKE_ALL}).train()
    stock = copy.deepcopy(ours)
    use_torchvision_detector(stock)
    images, targets = _batch(torch.Generator().manual_seed(len(counts)), counts)
    (mine, my_grads), (theirs, their_grads) = _losses(ours, images, targets), _losses(stock, images, targets)
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        assert mine[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for name, grad in their_grads.items():
        assert torch.allclose(my_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_proposals_equal_torchvision_for_a_batch(shallow: None) -> None:
    torch.manual_seed(0)
    ours = build_model({**CONFIG, "detections_per_img": 40}).eval()  # torchvision pastes masks one by one
    stock = copy.deepcopy(ours)
    use_torchvision_detector(stock)
    images, _ = _batch(torch.Generator().manual_seed(3), (1, 1, 1))
    with torch.no_grad():
        batch, _ = ours.transform(images)
        features = ours.backbone(batch.tensors)
        mine, _ = ours.rpn(batch, features)
        theirs, _ = stock.rpn(batch, features)
    assert [len(b) for b in mine] == [len(b) for b in theirs]
    # the same proposals; with several threads, two of equal objectness may come in either order
    assert all(sorted(a.tolist()) == sorted(b.tolist()) for a, b in zip(mine, theirs))
    with torch.no_grad():
        mine, theirs = ours(images), stock(images)
    for a, b in zip(mine, theirs):  # the same detections, in the same order up to ties of score
        assert torch.equal(a["scores"], b["scores"]) and len(a["scores"])
        assert sorted(_rows(a)) == sorted(_rows(b))


def _rows(detections: dict) -> list[tuple]:
    return [(s, lab, *box, m) for s, lab, box, m in zip(detections["scores"].tolist(), detections["labels"].tolist(),
                                                       detections["boxes"].tolist(),
                                                       detections["masks"].flatten(1).sum(1).tolist())]


def test_level_pooling_equals_torchvision_with_gradients() -> None:
    generator = torch.Generator().manual_seed(0)
    names = ["0", "1", "2", "3"]
    features = {n: torch.rand(2, 8, 64 >> i, 48 >> i, generator=generator, requires_grad=True)
                for i, n in enumerate(names)}
    boxes = [_boxes(40, 192, generator), _boxes(0, 192, generator), _boxes(25, 192, generator) * 0.2]
    boxes[2][:5] *= 5  # some RoIs on every level
    shapes = [(256, 192)] * 3
    features = {n: f[:1].expand(3, -1, -1, -1) for n, f in features.items()}
    outputs = []
    for pool in (LevelRoIAlign(names, 7, 2), MultiScaleRoIAlign(names, 7, 2)):
        out = pool(features, boxes, shapes)
        grads = torch.autograd.grad(out.square().sum(), [features[n] for n in names])
        outputs.append((out, grads))
    (mine, my_grads), (theirs, their_grads) = outputs
    assert mine.shape == (65, 8, 7, 7)
    assert torch.equal(mine, theirs)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(my_grads, their_grads))


@pytest.mark.parametrize("positives,negatives,ignored", [(300, 5000, 100), (10, 40, 7), (0, 20, 0), (50, 0, 3)])
def test_sampler_counts_equal_torchvision(positives: int, negatives: int, ignored: int) -> None:
    labels = torch.cat([torch.randint(1, 5, (positives,)), torch.zeros(negatives, dtype=torch.int64),
                        torch.full((ignored,), -1)])
    labels = labels[torch.randperm(len(labels))]
    torch.manual_seed(0)
    pos, neg = sample(labels, 256, 0.25)
    stock_pos, stock_neg = BalancedPositiveNegativeSampler(256, 0.25)([labels])
    assert int(pos.sum()) == int(stock_pos[0].sum()) and int(neg.sum()) == int(stock_neg[0].sum())
    assert bool((labels[pos] >= 1).all()) and bool((labels[neg] == 0).all())
    torch.manual_seed(1)
    again, _ = sample(labels, 256, 0.25)
    assert positives <= 64 or not torch.equal(pos, again)  # a random draw, not the first candidates


def test_nms_segments_keep_what_nms_per_segment_keeps() -> None:
    from torchvision.ops import nms

    generator = torch.Generator().manual_seed(0)
    lengths = [300, 120, 300, 5]
    boxes = _boxes(sum(lengths), 96, generator)
    scores = torch.rand(len(boxes), generator=generator)
    scores[::7] = -torch.inf
    expected, start = [], 0
    for n in lengths:
        expected.append(nms(boxes[start:start + n], scores[start:start + n], 0.5) + start)
        start += n
    import detector

    for cap, bound in ((100, 96), (10_000, 96), (10_000, 40_000)):  # the last adds offsets in float64
        detector.NMS_CHUNK, saved = cap, detector.NMS_CHUNK
        try:
            kept = nms_segments(boxes, scores, lengths, 0.5, bound)
        finally:
            detector.NMS_CHUNK = saved
        assert sorted(kept.tolist()) == sorted(torch.cat(expected).tolist())
    assert _chunks([300, 120, 300, 5], 500) == [[300, 120], [300, 5]]


def test_top_per_image_orders_and_cuts_each_image() -> None:
    scores = torch.tensor([0.1, 0.9, -torch.inf, 0.5, 0.7, 0.3])
    image_of = torch.tensor([0, 0, 0, 1, 1, 1])
    picked = top_per_image(scores, torch.tensor([4, 1, 0, 2, 3, 5]), image_of, 3, 2)
    assert [p.tolist() for p in picked] == [[1, 0], [4, 3], []]


def test_detections_of_a_batch_equal_torchvision_per_image() -> None:
    from torchvision.models.detection.roi_heads import RoIHeads

    torch.manual_seed(0)
    model = build_model({**CONFIG, "detections_per_img": 40, "box_score_thresh": 0.05}).eval()
    heads = model.roi_heads
    generator = torch.Generator().manual_seed(1)
    proposals = [_boxes(300, 120, generator), _boxes(0, 120, generator), _boxes(90, 120, generator)]
    logits = torch.randn(390, 5, generator=generator) * 3
    regression = torch.randn(390, 20, generator=generator)
    shapes = [(100, 120), (64, 64), (120, 90)]
    mine = heads.postprocess_detections(logits, regression, proposals, shapes)
    theirs = RoIHeads.postprocess_detections(heads, logits, regression, proposals, shapes)
    for part, (a, b) in enumerate(zip(mine, theirs)):
        assert [len(x) for x in a] == [len(x) for x in b] and len(a[0]) == 40 and len(a[1]) == 0
        assert all(torch.equal(x, y) for x, y in zip(a, b)), part


def test_degenerate_boxes_are_refused_on_the_host() -> None:
    check_boxes([{"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "image_id": 1}])
    with pytest.raises(ValueError, match="image 7: box"):
        check_boxes([{"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0], [2.0, 3.0, 2.0, 5.0]]), "image_id": 7}])


@pytest.mark.parametrize("heads", [{}, {"mask_iou": True}, {"type_map": 0.5}])
def test_a_training_step_reads_the_device_a_fixed_number_of_times(heads: dict, shallow: None) -> None:
    from benchmarks.host_syncs import SyncCounter

    model = build_model({**CONFIG, **heads, "box_batch_size_per_image": 32}).train()  # few RoIs: a quick step
    images, targets = _batch(torch.Generator().manual_seed(0), (1, 1))
    model(images, targets)  # the poolers work out their scales once, on the first call
    counts = []
    for cells in ((3, 2), (30, 25)):
        images, targets = _batch(torch.Generator().manual_seed(0), cells)
        with SyncCounter(torch.device("cpu")) as counter:
            sum(model(images, targets).values()).backward()
        counts.append(counter.total())
    assert counts[0] == counts[1] <= 6  # NMS chunk, RPN counts, 2 poolings, positives; none for the added heads


def test_boxes_are_decoded_in_float32_under_autocast() -> None:
    """Anchors, the RPN's and the box head's decoding stay float32 under bf16 autocast: the
    same low-precision deltas decode to the float32 result within 1e-3 px, where torchvision's
    coder, which casts the boxes to the deltas' dtype, is off by pixels at 1000-2000 px."""
    from torchvision.models.detection._utils import BoxCoder
    from torchvision.models.detection.image_list import ImageList

    from detector import Fp32AnchorGenerator, Fp32BoxCoder

    generator = torch.Generator().manual_seed(0)
    proposals = _boxes(500, 2000, generator)
    deltas = (torch.randn(500, 4, generator=generator) * 0.3).bfloat16()
    weights = (10.0, 10.0, 5.0, 5.0)
    reference = BoxCoder(weights).decode(deltas.float(), [proposals])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = Fp32BoxCoder(weights).decode(deltas, [proposals])
        stock = BoxCoder(weights).decode(deltas, [proposals])
    assert ours.dtype == torch.float32 and (ours - reference).abs().max() < 1e-3
    assert (stock.float() - reference).abs().max() > 1.0  # what it fixes
    sizes, ratios = ((16,), (32,)), ((0.5, 1.0, 2.0),) * 2
    features = [torch.zeros(1, 8, 125, 125, dtype=torch.bfloat16), torch.zeros(1, 8, 63, 63, dtype=torch.bfloat16)]
    images = ImageList(torch.zeros(1, 3, 1000, 1000), [(1000, 1000)])
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    generator_ = Fp32AnchorGenerator(sizes, ratios)
    two = ImageList(torch.zeros(2, 3, 1000, 1000), [(1000, 1000), (990, 1000)])
    anchors = generator_(two, features)
    expected = AnchorGenerator(sizes, ratios)(two, [f.float() for f in features])
    assert len(anchors) == 2 and all(a.dtype == torch.float32 and torch.equal(a, e) for a, e in zip(anchors, expected))
    again = generator_(images, features)[0]  # served from the cache
    assert again is anchors[0]
    smaller = [torch.zeros(1, 8, 64, 64), torch.zeros(1, 8, 32, 32)]
    other = generator_(ImageList(torch.zeros(1, 3, 512, 512), [(512, 512)]), smaller)[0]
    assert torch.equal(other, AnchorGenerator(sizes, ratios)(ImageList(torch.zeros(1, 3, 512, 512), [(512, 512)]),
                                                               smaller)[0])
    model = build_model({**CONFIG, "weights": "none"}, load_weights=False)
    assert isinstance(model.rpn.box_coder, Fp32BoxCoder) and isinstance(model.roi_heads.box_coder, Fp32BoxCoder)
    assert isinstance(model.rpn.anchor_generator, Fp32AnchorGenerator)
    use_torchvision_detector(model)
    assert type(model.rpn.box_coder) is BoxCoder


def test_frozen_batchnorm_keeps_the_input_dtype() -> None:
    """Frozen BatchNorm returns bf16 for bf16 input (torchvision's promotes it to float32),
    with torchvision's values, and loads torchvision's state dict as it is."""
    from torchvision.ops import FrozenBatchNorm2d as Stock

    from detector import FrozenBatchNorm2d

    stock, ours = Stock(8), FrozenBatchNorm2d(8)
    generator = torch.Generator().manual_seed(1)
    for name in ("weight", "bias", "running_mean"):
        getattr(stock, name).copy_(torch.randn(8, generator=generator))
    stock.running_var.copy_(torch.rand(8, generator=generator) + 0.5)
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(2, 8, 5, 5, generator=generator)
    torch.testing.assert_close(ours(x), stock(x))
    assert stock(x.bfloat16()).dtype == torch.float32 and ours(x.bfloat16()).dtype == torch.bfloat16
    torch.testing.assert_close(ours(x.bfloat16()).float(), stock(x), rtol=2e-2, atol=2e-2)


def test_an_unsure_cell_is_detected_under_each_plausible_class() -> None:
    """A proposal whose classifier splits between classes 1 and 3 yields a detection of each
    (class-specific boxes, per-class NMS): the per-class scorer can count the cell under
    either, and the rare-class hypothesis is not suppressed by the common one."""
    model = build_model({**CONFIG, "box_score_thresh": 0.05}, load_weights=False).eval()
    heads = model.roi_heads
    proposals = [torch.tensor([[10.0, 10.0, 30.0, 30.0], [60.0, 60.0, 80.0, 80.0]])]
    probs = torch.tensor([[0.05, 0.55, 0.02, 0.35, 0.03], [0.1, 0.0, 0.9, 0.0, 0.0]])
    logits = probs.clamp(min=1e-6).log()
    deltas = torch.zeros(2, 4 * 5)
    boxes, scores, labels = heads.postprocess_detections(logits, deltas, proposals, [(100, 100)])
    found = sorted((int(lab), round(float(s), 2)) for lab, s in zip(labels[0], scores[0]))
    assert found == [(1, 0.55), (2, 0.9), (3, 0.35)]
    first = boxes[0][labels[0] == 1][0]
    assert torch.equal(boxes[0][labels[0] == 3][0], first)  # the same cell, both hypotheses kept


def test_group_ranks_rank_within_each_group_by_score() -> None:
    generator = torch.Generator().manual_seed(4)
    scores = torch.rand(60, generator=generator)
    groups = torch.randint(0, 5, (60,), generator=generator)
    ranks = group_ranks(scores, groups)
    for i in range(60):  # the oracle: how many of its group score higher
        assert ranks[i] == int(((groups == groups[i]) & (scores > scores[i])).sum())


def test_a_dense_image_keeps_each_class_best_up_to_the_class_cap() -> None:
    """Forty cells of class 1 outscore ten of class 3: with 20 detections an image, class 3
    is crowded out; with 8 a class, each class keeps its 8 best, class 3 included, and the
    image's 20 are still the best of what the class caps leave."""
    model = build_model({**CONFIG, "box_score_thresh": 0.05, "detections_per_img": 20}, load_weights=False).eval()
    heads = model.roi_heads
    corners = torch.stack([torch.arange(50.0) % 10 * 20, torch.arange(50.0) // 10 * 20], dim=1)
    proposals = [torch.cat([corners, corners + 15], dim=1)]  # 50 disjoint boxes
    probs = torch.full((50, 5), 1e-4)
    probs[:40, 1] = torch.linspace(0.9, 0.5, 40)  # class 1: 40 sure cells
    probs[40:, 3] = torch.linspace(0.4, 0.2, 10)  # class 3: 10 less sure ones
    logits, deltas = probs.log(), torch.zeros(50, 20)
    _, scores, labels = heads.postprocess_detections(logits, deltas, proposals, [(200, 200)])
    assert labels[0].tolist() == [1] * 20
    heads.detections_per_class = 8
    _, scores, labels = heads.postprocess_detections(logits, deltas, proposals, [(200, 200)])
    assert sorted(labels[0].tolist()) == [1] * 8 + [3] * 8
    best_3 = torch.softmax(logits[40:48], dim=1)[:, 3]
    assert torch.allclose(scores[0][labels[0] == 3], best_3)  # class 3's eight best, best first
    assert torch.equal(scores[0], scores[0].sort(descending=True).values)
