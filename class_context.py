"""Neighbour class context (``--class_context``): each cell's class hypotheses re-weighed by the
classes the cells around it are detected as.

Cells of one type cluster in tissue (epithelium in glands, lymphocytes in infiltrates,
spindle cells in stroma), while the box head classifies each cell from a 7 x 7 window of its
own features. On held-out CoNSeP, the same detections given their true classes score far higher
(``benchmarks/accuracy.py --post ...+trueclass``, benchmarks/RESULTS.md): the classes, not the
cells, are what is missing, and this uses what the image itself says about them.

Every detection is one class hypothesis of a cell: the model keeps each RoI once per class
above ``--box_score_thresh``, and the merge drops duplicates of a class only. Detections with
box IoU >= ``SAME_CELL`` are taken as one cell; the score mass of a cell's hypotheses per class
is its class distribution, and the neighbours' (the other cells, weighed by distance) is a
prior for it. Each hypothesis then gets its share of its cell's mass under the posterior:

    prior_k(c) = (sum_j w_jk mass_j(c) + 1 / C) / (sum_j w_jk mass_j + 1)     j: hypotheses not of k's cell
    score_k   <- score_k * prior_k(label_k) ** a / sum_c share_k(c) prior_k(c) ** a

with w_jk = exp(-d_jk^2 / 2 (reach r_k)^2), d the distance between box centres, r_k the
geometric mean side of k's box (so the neighbourhood scales with the cell, the same at any
input scale), share_k(c) the part of k's cell's score mass in class c, and a the strength.
Where a cell's hypotheses share one box (and so one prior) they keep their total, moved between
classes; an isolated cell (prior 1 / C for every class, the pseudo-count) and a cell with one
hypothesis are unchanged. Computed in fp32 whatever the autocast, so ``--use_amp`` and the
benchmark's rescoring of saved detections agree; a NaN score counts as no mass.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

SAME_CELL = 0.5  # box IoU at which two detections are taken as hypotheses of one cell
CHUNK = 1024  # detections rescored per pass: [CHUNK, N] matrices, bounded memory on a whole slide


def rescore(boxes: Tensor, labels: Tensor, scores: Tensor, classes: int, strength: float,
            reach: float = 3.0) -> Tensor:
    """``scores`` [N] of one image's detections (``boxes`` [N, 4] x1 y1 x2 y2, ``labels`` [N] in
    1..``classes``) moved between each cell's class hypotheses by its neighbours' classes, to
    the power ``strength`` (0: unchanged). All on the detections' device, without a host sync."""
    if strength == 0 or len(scores) == 0:
        return scores
    with torch.autocast(scores.device.type, enabled=False):
        return scores * _factors(boxes.float(), labels, scores.float().nan_to_num(0.0), classes, strength,
                                 reach).to(scores.dtype)


def _factors(boxes: Tensor, labels: Tensor, scores: Tensor, classes: int, strength: float, reach: float) -> Tensor:
    """Each detection's posterior over prior share (``rescore``), in fp32."""
    n, device = len(scores), scores.device
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    sides = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-3)
    radius = reach * sides.prod(dim=1).sqrt()
    mass = torch.zeros((n, classes), device=device)
    mass[torch.arange(n, device=device), labels - 1] = scores  # [N, C]: each hypothesis
    factors = []
    for start in range(0, n, CHUNK):  # chunks of detections: N is a shape, no sync
        part = slice(start, start + CHUNK)
        same = box_iou(boxes[part], boxes) >= SAME_CELL  # [chunk, N]
        same[:, part].fill_diagonal_(True)  # its own hypothesis, even for an empty box
        gap = (centres[part, None] - centres[None]).square().sum(dim=-1)  # exact squared distances
        near = torch.exp(-gap / (2 * radius[part, None].square()))
        evidence = (near * ~same) @ mass  # [chunk, C]: the neighbours' score mass per class
        prior = ((evidence + 1 / classes) / (evidence.sum(dim=1, keepdim=True) + 1)).pow(strength)
        cell = same.float() @ mass  # [chunk, C]: k's cell's score mass per class
        expected = (cell * prior).sum(dim=1) / cell.sum(dim=1).clamp(min=1e-12)
        factors.append(prior.gather(1, (labels[part] - 1)[:, None]).squeeze(1) / expected.clamp(min=1e-12))
    return torch.cat(factors)
