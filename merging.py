"""The batched merge shared by tiles, TTA views and ensembles: every cell kept once.

Every tile and view is predicted on its own and mapped back to image coordinates
(``tiling.py``, ``tta.py``); the merge then keeps every cell once. It runs in two steps, both
batched on the model's device:

1. ``select_candidates`` (boxes only, before any mask is computed): a class-wise box NMS over
   all views, whole detections before those cut by an inner tile border, then the image's
   ``cap`` first. Only these (and, with ``--merge avg``, their copies) get masks, so the mask
   head never sees what cannot be submitted.
2. ``greedy_mask_merge`` (pasted masks): a detection lying mostly (intersection over the
   smaller mask > ``match_thresh``) inside a kept one of the same class is a duplicate; this
   catches cut pieces whose boxes overlap the whole cell too little for the box NMS (and a
   cut piece lying mostly inside a kept box is one too).

``--merge avg`` (the default with TTA views) adds a step between them: each candidate's copies
from the other views and models (``same_cell_copies``) get masks too, which are resampled into
the candidate's box and averaged with its own (``average_masks``). Between them too, the
candidates' scores may count how many views and models found each (``votes``, ``--vote_boost``)
or become its mean over them (``consensus``, ``--consensus``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, nms

from detector import group_ranks
from masks import PackedMasks, mask_areas, pixel_chunks


def select_candidates(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, cut: torch.Tensor,
                      cap: int, copies: int, iou: float = 0.5, per_class: int = 0) -> torch.Tensor:
    """Indices of the detections worth a mask: per class, a box NMS in merge order (whole
    detections by score, then cut ones, the largest first: that copy holds the most of its
    cell), then the first ``cap`` survivors in that order (cut pieces, mostly duplicates the
    mask merge drops, only where whole detections are fewer), at most ``per_class`` of a
    class when it is above 0.

    Before the NMS only the ``cap * copies`` first in merge order are kept (``per_class *
    copies`` of a class): one cell yields at most ``copies`` detections (tiles over a pixel x
    views), so later ones cannot be among the cells submitted.
    """
    key = merge_order(boxes, scores, cut)
    if per_class > 0:  # a class's detections beyond its share never enter the pool
        key = torch.where(group_ranks(key, labels) < per_class * copies, key, -math.inf)
    pool = key.topk(cap * copies).indices if len(key) > cap * copies else torch.arange(len(key), device=key.device)
    kept = pool[class_nms(boxes[pool], key[pool], labels[pool], iou)]
    if per_class > 0:
        ok = (group_ranks(key[kept], labels[kept]) < per_class) & (key[kept] > -math.inf)
        kept = kept[ok]  # host sync: the class-capped count, once per image (as the NMS's)
    return kept[:cap]


def class_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float) -> torch.Tensor:
    """torchvision's ``batched_nms`` (NMS within each label, kept indices by score), its classes
    kept apart by offsets built on the device: torchvision builds its offset with a blocking
    host-to-device copy. In float64, exact for any image and class count (one call per image)."""
    boxes = boxes.double()
    span = boxes.max() + 1 if len(boxes) else 1.0
    return nms(boxes + labels[:, None].double() * span, scores.double(), iou)  # host sync: the kept count


def merge_order(boxes: torch.Tensor, scores: torch.Tensor, cut: torch.Tensor,
                area: torch.Tensor | None = None) -> torch.Tensor:
    """A sort key of the merge: whole detections (key 2 + score) before cut ones (1 + their
    share of the largest area: mask pixels where given, else box area), higher first."""
    if area is None:
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area = area.float()
    share = area / (area.max().clamp(min=1.0) * 1.001) if len(area) else area
    return torch.where(cut, 1.0 + share, 2.0 + scores.float())


def greedy_mask_merge(masks: PackedMasks, labels: torch.Tensor, key: torch.Tensor, cut: torch.Tensor | None = None,
                      match_thresh: float = 0.5) -> torch.Tensor:
    """Which detections a greedy pass in ``key`` order (highest first) keeps, where a
    detection is dropped when its mask lies mostly (intersection over the smaller mask >
    ``match_thresh``) inside a kept one of the same class; a ``cut`` one also when its box
    does (a sliver of a cell cut by a tile edge is too small for its mask to tell). Returns
    a bool [N] mask."""
    first, second = _rival_pairs(masks.boxes, labels, key)
    inter = pair_intersections(masks, first, second)
    areas = mask_areas(masks).to(inter.dtype)
    dup = inter > match_thresh * torch.minimum(areas[first], areas[second])
    if cut is not None:
        boxes = masks.boxes
        side = (torch.minimum(boxes[first, 2:], boxes[second, 2:]) - torch.maximum(boxes[first, :2], boxes[second, :2]))
        box_inter = side.clamp(min=0).prod(dim=1)
        box_area = (boxes[second, 2:] - boxes[second, :2]).prod(dim=1)
        dup |= cut[second] & (box_inter > match_thresh * box_area)
    return _greedy_keep(len(labels), first, second, dup)


def same_cell_pairs(boxes: torch.Tensor, labels: torch.Tensor, pool_boxes: torch.Tensor, pool_labels: torch.Tensor,
                    iou: float = 0.5, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """(cell, pool index) pairs where a pool detection of the cell's class overlaps its box with
    IoU > ``iou``: the cell's copies. Batched over the pool ``chunk`` detections at a time."""
    cells, others = [boxes.new_zeros(0, dtype=torch.int64)], [boxes.new_zeros(0, dtype=torch.int64)]
    for start in range(0, len(pool_boxes), chunk):
        part = slice(start, start + chunk)
        hit = (box_iou(boxes, pool_boxes[part]) > iou) & (labels[:, None] == pool_labels[part][None])
        cell, other = hit.nonzero(as_tuple=True)  # host sync: how many copies (once per chunk)
        cells.append(cell)
        others.append(other + start)
    return torch.cat(cells), torch.cat(others)


def same_cell_copies(cell: torch.Tensor, other: torch.Tensor, scores: torch.Tensor, source: torch.Tensor,
                     cut: torch.Tensor, own_source: torch.Tensor, n_sources: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The copies worth averaging among ``same_cell_pairs``: whole ones from the other sources
    (model x view, numbered below ``n_sources``; a cell's own source, its neighbouring tiles
    included, already gave it its mask), the best-scoring one per source."""
    useful = (~cut[other] & (source[other] != own_source[cell])).nonzero().squeeze(1)  # host sync: how many
    cell, other = cell[useful], other[useful]
    group = cell * n_sources + source[other]
    order = torch.argsort(scores[other], descending=True, stable=True)
    order = order[torch.argsort(group[order], stable=True)]  # by group, best score first within it
    first = torch.ones_like(order, dtype=torch.bool)
    first[1:] = group[order][1:] != group[order][:-1]
    best = order[first]  # host sync: how many (cell, source) groups
    return cell[best], other[best]


def average_masks(probs: torch.Tensor, boxes: torch.Tensor, copy_probs: torch.Tensor, copy_boxes: torch.Tensor,
                  copy_of: torch.Tensor) -> torch.Tensor:
    """Each cell's box-relative mask probabilities ([K, M, M] in ``boxes``) averaged with those of
    its copies (``copy_of[j]`` the cell of copy j), each copy first resampled from its own box
    into its cell's: what a copy's box leaves out counts as background, as when pasting."""
    copies = resample_masks(copy_probs, copy_boxes, boxes[copy_of])
    total = probs.float().index_add(0, copy_of, copies)
    count = torch.ones(len(probs), device=probs.device).index_add(0, copy_of, copies.new_ones(len(copy_of)))
    return total / count[:, None, None]


def resample_masks(probs: torch.Tensor, boxes: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
    """Box-relative mask probabilities [K, M, M] of ``boxes`` seen in ``target_boxes``' frames:
    one bilinear ``grid_sample`` for all of them, zero outside the source box."""
    size = probs.shape[-1]
    centre = (torch.arange(size, device=probs.device, dtype=torch.float32) + 0.5) / size  # cell centres, box share
    src, dst = boxes.float(), target_boxes.float()
    x = dst[:, None, 0] + centre[None] * (dst[:, None, 2] - dst[:, None, 0])  # [K, M] image coordinates
    y = dst[:, None, 1] + centre[None] * (dst[:, None, 3] - dst[:, None, 1])
    gx = 2 * (x - src[:, None, 0]) / (src[:, None, 2] - src[:, None, 0]).clamp(min=1e-6) - 1
    gy = 2 * (y - src[:, None, 1]) / (src[:, None, 3] - src[:, None, 1]).clamp(min=1e-6) - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # [K, M, M, (x, y)]
    return F.grid_sample(probs[:, None].float(), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)[:, 0]


def take(masks: PackedMasks, index: torch.Tensor, pixels: int | None = None) -> PackedMasks:
    """The packed masks ``index`` selects, in that order, gathered in one indexing step.
    ``pixels``, their pixel total where the caller knows it (``selected``), spares the read of
    it from the device (a host sync on a GPU)."""
    counts = masks.offsets.diff()[index]
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    owner = torch.repeat_interleave(torch.arange(len(index), device=counts.device), counts, output_size=pixels)
    source = masks.offsets[index][owner] + torch.arange(len(owner), device=counts.device) - offsets[owner]
    return PackedMasks(masks.data[source], masks.boxes[index], offsets, masks.size)


def selected(chosen: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The indices where bool ``chosen`` is set, and the pixel total of their masks (``sizes``,
    each mask's pixels), read from the device together: the one host sync that both the
    selection's length and ``take``'s output size need."""
    count, pixels = torch.stack([chosen.sum(), (sizes * chosen).sum()]).tolist()  # host sync: once per call
    return torch.nonzero_static(chosen, size=int(count)).flatten(), int(pixels)


def pair_intersections(masks: PackedMasks, first: torch.Tensor, second: torch.Tensor,
                       chunk_pixels: int = 1 << 24) -> torch.Tensor:
    """|A ∩ B| of packed masks for each pair (first[p], second[p]), pixel-exact, batched over
    the pixels of all pairs' box intersections, in chunks of about ``chunk_pixels``."""
    boxes = masks.boxes
    lo = torch.maximum(boxes[first, :2], boxes[second, :2])
    size = (torch.minimum(boxes[first, 2:], boxes[second, 2:]) - lo).clamp(min=0)  # [P, 2] as (w, h)
    counts = size[:, 0] * size[:, 1]
    out = torch.zeros(len(first), dtype=torch.int64, device=boxes.device)
    for start, stop, pixels in pixel_chunks(counts, chunk_pixels):
        out[start:stop] = _intersections(masks, first[start:stop], second[start:stop], lo[start:stop],
                                         size[start:stop], counts[start:stop], pixels)
    return out


def _intersections(masks: PackedMasks, first: torch.Tensor, second: torch.Tensor, lo: torch.Tensor,
                   size: torch.Tensor, counts: torch.Tensor, pixels: int) -> torch.Tensor:
    pair = torch.repeat_interleave(torch.arange(len(first), device=first.device), counts, output_size=pixels)
    local = torch.arange(pixels, device=first.device) - (counts.cumsum(0) - counts)[pair]
    width = size[pair, 0].clamp(min=1)
    x = lo[pair, 0] + local % width
    y = lo[pair, 1] + local // width
    both = _bit(masks, first[pair], x, y) & _bit(masks, second[pair], x, y)
    return torch.zeros(len(first), dtype=torch.int64, device=first.device).index_add_(0, pair, both.to(torch.int64))


def _bit(masks: PackedMasks, index: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pixel (x, y) of mask ``index`` (image coordinates inside its box)."""
    box = masks.boxes[index]
    flat = masks.offsets[index] + (y - box[:, 1]) * (box[:, 2] - box[:, 0]) + (x - box[:, 0])
    return masks.data[flat].bool()


def _rival_pairs(boxes: torch.Tensor, labels: torch.Tensor, key: torch.Tensor,
                 chunk: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """(earlier, later) index pairs in merge order with the same class and overlapping boxes,
    sorted by (earlier, later).

    A sweep along x, not an N x N comparison: a window streamed with every weak candidate
    holds tens of thousands of detections, whose N x N masks took seconds and gigabytes
    (``benchmarks/merge_scaling.py``). With the boxes sorted by x1, the boxes that can overlap
    box p are those after it that start before its right edge (``searchsorted``), so only
    those candidate pairs are built, in chunks of about ``chunk`` pairs, and then tested
    exactly. A NaN key ranks last, as the lowest score would."""
    n = len(boxes)
    b = boxes.float()
    key = key.masked_fill(key.isnan(), -math.inf)  # NaN compares false both ways: it would orient pairs arbitrarily
    order = torch.argsort(b[:, 0], stable=True)
    starts = b[order, 0].contiguous()
    stop = torch.searchsorted(starts, b[order, 2].contiguous(), side="left")  # first sorted box starting at x2 or later
    position = torch.arange(n, device=boxes.device)
    counts = (stop - position - 1).clamp(min=0)
    firsts, seconds = [boxes.new_zeros(0, dtype=torch.int64)], [boxes.new_zeros(0, dtype=torch.int64)]
    for start, end, total in pixel_chunks(counts, chunk):  # host sync: the candidate count (once per image)
        p = torch.repeat_interleave(position[start:end], counts[start:end], output_size=total)
        first_of_box = counts[start:end].cumsum(0) - counts[start:end]  # where each box's candidates begin
        q = p + 1 + torch.arange(total, device=boxes.device) - first_of_box[p - start]
        i, j = order[p], order[q]
        hit = ((b[i, 0] < b[j, 2]) & (b[j, 0] < b[i, 2]) & (b[i, 1] < b[j, 3]) & (b[j, 1] < b[i, 3])
               & (labels[i] == labels[j]))
        kept = hit.nonzero().squeeze(1)  # host sync: how many pairs (once per chunk)
        i, j = i[kept], j[kept]
        earlier = (key[i] > key[j]) | ((key[i] == key[j]) & (i < j))
        firsts.append(torch.where(earlier, i, j))
        seconds.append(torch.where(earlier, j, i))
    first, second = torch.cat(firsts), torch.cat(seconds)
    rank = torch.argsort(first * n + second)  # the order of the N x N comparison's nonzero()
    return first[rank], second[rank]


def _greedy_keep(n: int, src: torch.Tensor, dst: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """The outcome of a greedy pass where ``src[p]`` (earlier) drops ``dst[p]`` if kept and
    ``live[p]``, resolved in rounds instead of one detection at a time: a detection whose rivals
    are all dropped is kept, one with a kept rival is dropped. Each round settles at least the
    earliest open detection, and chains of duplicates are short, so rounds are few."""
    state = torch.zeros(n, dtype=torch.int8, device=live.device)  # 0 open, 1 kept, -1 dropped
    for _ in range(n + 1):
        dropped = _any_into(n, dst, live & (state[src] == 1))
        state = torch.where((state == 0) & dropped, -1, state)
        blocked = _any_into(n, dst, live & (state[src] == 0))
        state = torch.where((state == 0) & ~blocked, 1, state)
        if not bool((state == 0).any()):  # host sync: one per round
            break
    return state == 1


def _any_into(n: int, index: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """out[i] = any(flags[p] for index[p] == i), by a scatter (a boolean-mask write would sync)."""
    return torch.zeros(n, dtype=torch.int32, device=flags.device).index_add_(0, index, flags.int()) > 0


def consensus(cell: torch.Tensor, source: torch.Tensor, scores: torch.Tensor, cells: int,
              n_sources: int) -> torch.Tensor:
    """Each of ``cells`` cells' score averaged over all ``n_sources`` sources (model x view):
    the best of its copies in each (``scores`` of its ``same_cell_pairs`` detections and of
    itself, each pair's ``cell`` and ``source``), 0 where a source found no copy of its class;
    tiles of one view count once. Averaging class probabilities over views is what test-time
    augmentation does for a classifier: a class the views agree on outranks one that a single
    view was sure of."""
    best = scores.new_zeros(cells * n_sources).scatter_reduce(0, cell * n_sources + source, scores, "amax")
    return best.view(cells, n_sources).mean(dim=1)


def votes(cell: torch.Tensor, source: torch.Tensor, cells: int, n_sources: int) -> torch.Tensor:
    """How many sources (model x view) detected each of ``cells`` cells, from its
    ``same_cell_pairs`` (``source`` of each pair's detection); tiles of one view count once."""
    seen = torch.zeros((cells, n_sources), dtype=torch.bool, device=cell.device)
    seen[cell, source] = True
    return seen.sum(dim=1).clamp(min=1).to(torch.float32)
